"""vLLM's engine core process, forked from a server that imported vLLM while the actor did.

Inside a Ray actor vLLM *spawns* its engine core's process once the engine's config is made
(forking a Ray worker, with its threads, is unsafe), and that process imports vLLM and torch
again: 21-26 s of every engine start on the H100 test machine, after the actor's own import (raw
vLLM, in a plain process, forks in ~6 s). Here the engine actor starts a multiprocessing fork
server first thing, which imports the core's modules while the actor imports its own; when the
engine is built vLLM's core process is forked from that server, a plain process with no Ray
threads. The core still starts as a spawned one would, with the actor's environment at that
moment; the server ends with the actor, and Ray ends the core with the actor's other descendants
(tests/test_engine_actors.py kills an actor and watches its core go).
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing import context as mp_context
from multiprocessing import forkserver
from typing import Iterable


def start_server(modules: Iterable[str]) -> None:
    """Start this process's fork server; it imports ``modules`` in the background (returns at once)."""
    multiprocessing.set_forkserver_preload(list(modules))
    forkserver.ensure_running()


class CoreProcess(mp_context.ForkServerProcess):
    """A process forked from the fork server that starts as a spawned one: with the environment
    its parent has when it starts (vLLM sets variables for its core just before), not the
    server's."""

    def start(self) -> None:
        self._parent_environ = dict(os.environ)
        super().start()

    def run(self) -> None:
        os.environ.clear()
        os.environ.update(self._parent_environ)
        super().run()


class CoreContext:
    """The multiprocessing context vLLM's core launcher gets: ``Process`` is a ``CoreProcess``."""

    def __init__(self) -> None:
        self._base = multiprocessing.get_context("forkserver")

    def Process(self, *args, **kwargs) -> CoreProcess:  # noqa: N802 (multiprocessing's name)
        return CoreProcess(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._base, name)
