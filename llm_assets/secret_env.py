"""Secret environment variables travel as task/actor arguments, never inside a Ray runtime_env.

Ray writes runtime_envs to its session logs in plain text (the runtime-env agent logs each env it
creates; Ray Data logs each operator's remote args), so an ``HF_TOKEN`` or API key given in a
stage's ``runtime_env.env_vars`` would land in ``/tmp/ray/session_*/logs``. Variables whose names
look secret are taken out of the runtime_env and set in the worker's environment just before the
stage code runs; the rest stay in the runtime_env (set when the worker process starts).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

SECRET_NAME_PARTS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


def is_secret_name(name: str) -> bool:
    return any(part in name.upper() for part in SECRET_NAME_PARTS)


def split_runtime_env(runtime_env: Optional[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the runtime_env without secret variables, the secret variables)."""
    runtime_env = dict(runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    secrets = {name: value for name, value in env_vars.items() if is_secret_name(name)}
    if "env_vars" in runtime_env:
        runtime_env["env_vars"] = {name: value for name, value in env_vars.items() if name not in secrets}
    return runtime_env, secrets


@contextlib.contextmanager
def applied(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in this process while the block runs (task workers are reused: restore after)."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
