"""The Ray actor that hosts one engine replica, and the Ray options of such a process.

Used by a Serve deployment's replicas (``serve/``); the run's own engine actors are Ray Data's
(``execution/engine_stage.py``), with the same Ray options.
Nothing here imports Dagster.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from llm_assets.engines.base import Engine
from llm_assets.model_store import model_on_this_node
from llm_assets.secret_env import split_runtime_env

# Ray starts every worker process at niceness 15 (its RAY_worker_niceness), so that its own
# daemons stay responsive under load. An engine actor (and the engine core it forks) is one busy
# loop that feeds the GPU: at 15 it loses its core to any normal-priority process on a busy host,
# the run's own Dagster process included, which raw vLLM never does. Engines run at the normal
# priority; the CPU-stage tasks keep Ray's lower one and take the cores the engines leave.
ENGINE_PRIORITY_ENV = {"RAY_worker_niceness": "0"}


class EngineHost:
    """The actor hosting one replica. Created when a run starts, it imports the engine library
    while CPU stages run; ``start`` builds the engine (GPU memory, compile) when the run asks."""

    def __init__(self, engine: Engine, on_gpu: bool, secret_env: dict[str, str]):
        # Nothing slow here: the actor's readiness then means "placed", which a stalled run reports.
        os.environ.update(secret_env)  # this process is the engine's alone (see secret_env.py)
        self.engine, self.on_gpu = engine, on_gpu
        self.import_seconds: Optional[float] = None
        self.replica: Any = None

    async def prepare(self) -> float:
        """Import the engine library (idempotent); its seconds."""
        if self.import_seconds is None:
            started = time.perf_counter()
            self.engine.preimport(self.on_gpu)
            self.import_seconds = time.perf_counter() - started
        return self.import_seconds

    async def start(self, **replica_kwargs: Any) -> dict[str, Any]:
        await self.prepare()  # already done, unless Ray ran this call first
        if "model_source" in replica_kwargs:  # an S3 model: its files on this node first (model_store.py)
            replica_kwargs["model_source"] = model_on_this_node(replica_kwargs["model_source"])
        self.replica = self.engine.replica_class()(**replica_kwargs)
        ready = getattr(self.replica, "ready", None)
        if ready is not None:  # a replica whose engine runs elsewhere waits for it here (a Serve app)
            await ready()
        return {**self.replica.info(), "import_seconds": round(self.import_seconds or 0.0, 2)}

    async def process(self, batch):
        output = await self.replica.process(batch)
        return output, output.num_rows

    def fatal_errors(self):
        return self.replica.fatal_errors() if self.replica is not None else ()

    def shutdown(self) -> dict[str, Any]:
        return (self.replica.shutdown() or {}) if self.replica is not None else {}


def engine_actor_options(
    engine: Engine, config, on_gpu: bool, num_cpus: float, num_gpus: float, engines: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """Ray options of a process that hosts an engine (a pool's actor, a Serve replica: see
    engines/serve/), and the secret variables to hand it as an argument (see secret_env.py)."""
    runtime_env, secret_env = split_runtime_env(getattr(config, "runtime_env", None))
    runtime_env["env_vars"] = {
        **ENGINE_PRIORITY_ENV,
        **_cpu_threads_env(on_gpu, engines),
        **engine.actor_env(on_gpu),
        **runtime_env.get("env_vars", {}),
    }
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": runtime_env}
    if config.accelerator_type:
        options["accelerator_type"] = config.accelerator_type
    return options, secret_env


def _cpu_threads_env(on_gpu: bool, engines: int) -> dict[str, str]:
    """Without a GPU the engine computes on CPU cores. Ray sets an actor's OMP_NUM_THREADS to
    the CPUs it reserves (1), so the model ran on one thread where vLLM alone uses them all
    (embeddings on 2 cores: 0.56x raw vLLM's rate with one thread, 0.76x with two). The
    engines share this machine's cores; the CPU stages run at a lower priority (see above)."""
    if on_gpu:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cores // max(1, engines)))}
