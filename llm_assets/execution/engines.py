"""A run's engines: the engine stage's Ray Data operator (a fixed pool of engine actors, one
replica each), and what they held when the run is over. Imports no Dagster
(``llm_assets.resources.EnginePoolResource`` is its Dagster resource).

vLLM takes a minute or more to start on a GPU (compile, CUDA graphs), so the engines belong to
the run, not to one partition: a single-run backfill loads the model once. Ray Data creates the
actors when the run's dataset starts executing (they import the engine library and build at
once, while the CPU stages read and tokenize) and ends them when it is done. An engine whose
workers span several GPUs reserves a placement group per actor (``engines/placement.py``), made
when Ray Data creates the actor and removed when the run ends.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

from llm_assets.engines import placement as placements
from llm_assets.engines.host import engine_actor_options
from llm_assets.execution.dataset import EngineOp
from llm_assets.private_apis import ray_actor_death, ray_data_async_batches_per_task
from llm_assets.ray_session import RaySession

# Rows handed to an engine at once, per sequence it runs at once, when the user left
# max_concurrent_batches unset: rows of equal length finish in waves, and the engine's scheduler
# needs rows queued to refill its batch at once (ray.data.llm's 8 batches of 4 x 32 rows keep
# 1 024 in flight, as many as vLLM runs at once on an H100).
IN_FLIGHT_PER_SEQUENCE = 3
DEATH_SETTLES_S = 60.0  # Ray's default health checks mark a lost node dead within about 30 s


class PlacementGroups:
    """Ray Data's ``ray_remote_args_fn`` for the engine actors: one placement group per engine of
    the pool, its actor in the first bundle. An actor Ray Data starts in place of another (one that
    died) gets a group already made: Ray reschedules a group whose node is lost, and a group made
    for every actor start would hold its resources for nothing once its actor is gone."""

    def __init__(self, placement, num_cpus: float, size: int):
        self.placement, self.num_cpus, self.size = placement, num_cpus, size
        self.groups: list = []
        self.options: list[dict[str, Any]] = []
        self.starts = 0

    def __call__(self) -> dict[str, Any]:
        if len(self.groups) < self.size:
            group, options = placements.reserve(self.placement, self.num_cpus)
            self.groups.append(group)
            self.options.append({key: value for key, value in options.items() if key == "scheduling_strategy"})
        chosen = self.options[self.starts % len(self.options)]
        self.starts += 1
        return chosen

    def release(self, log: Callable[[str], None]) -> None:
        groups, self.groups = self.groups, []
        for group in groups:
            placements.release(group, log)


class RunEngines:
    def __init__(
        self,
        session: RaySession,
        num_cpus_per_engine: float = 1.0,
        start_timeout_s: float = 1800.0,
        max_engine_restarts: int = 3,
        model_s3: Any = None,
        price_per_gpu_hour: Optional[float] = None,
    ):
        self.session = session
        self.num_cpus_per_engine, self.start_timeout_s = num_cpus_per_engine, start_timeout_s
        self.max_engine_restarts, self.model_s3 = max_engine_restarts, model_s3
        self.price_per_gpu_hour = price_per_gpu_hour

    def on_gpu(self) -> bool:
        self.session.ensure_started()
        return self.session.cluster_gpus() > 0

    def operator(self, pipeline, target: str, log: Callable[[str], None]) -> tuple[EngineOp, Optional[PlacementGroups]]:
        """The engine stage's operator for the pipeline (``target``: the resolved model)."""
        engine, config = pipeline.engine, pipeline.engine.config
        on_gpu, detokenizes = self.on_gpu(), pipeline.engine_detokenizes()
        replica_kwargs = engine.replica_kwargs(target, on_gpu, detokenizes)
        # What the replicas connect to, outside the run (a Serve app).
        replica_kwargs.update(engine.provision(target, on_gpu, detokenizes, log))
        gpus, size = engine.gpus_per_replica(on_gpu), config.engine_pool_size
        options, secret_env = engine_actor_options(engine, config, on_gpu, self.num_cpus_per_engine, gpus, size)
        options["max_restarts"] = self.max_engine_restarts
        placement, groups = engine.placement(on_gpu), None
        if placement is not None:
            placement = placements.with_accelerator(placement, config.accelerator_type)
            placements.check_fits(placement, size, f"{engine.label} for {target}")
            groups = PlacementGroups(placement, self.num_cpus_per_engine, size)
            options.pop("accelerator_type", None)  # the group's first bundle carries it
            options["num_cpus"] = min(self.num_cpus_per_engine, placement.bundles[0].get("CPU", 0))
            options["num_gpus"] = placement.actor_gpus
        calls = concurrent_batches(config, engine.sequences_at_once(on_gpu))
        in_flight = calls * ray_data_async_batches_per_task() * config.batch_size
        log(
            f"{engine.label} for {target}: {size} engine actor(s) ({gpus:g} GPU(s) each, "
            f"{'GPU' if on_gpu else 'CPU'} build"
            + (f"; each reserves a placement group of {placement.describe()}" if placement else "")
            + f"; up to {in_flight} rows in flight each: {calls} tasks at once)"
        )
        op = EngineOp(
            kwargs={"engine": engine, "replica_kwargs": replica_kwargs, "on_gpu": on_gpu, "secret_env": secret_env},
            options=options,
            target=target,
            size=size,
            batch_size=config.batch_size,
            max_concurrency=calls,
            max_tasks_in_flight=getattr(config, "max_tasks_in_flight_per_actor", None),
            remote_args_fn=groups,
        )
        return op, groups

    def reservation(self, pipeline) -> dict[str, float]:
        """What the pipeline's engines hold for the whole run: CPUs and GPUs, in all and each."""
        gpus = float(pipeline.engine.gpus_per_replica(self.on_gpu()))
        replicas = pipeline.config.engine_pool_size
        return {
            "CPU": self.num_cpus_per_engine * replicas,
            "GPU": gpus * replicas,
            "CPU_each": self.num_cpus_per_engine,
            "GPU_each": gpus,
        }


def concurrent_batches(config: Any, sequences: Optional[int]) -> int:
    """The engine actor's concurrent Ray Data tasks: max_concurrent_batches as the user set it;
    unset, at least its default and enough to keep IN_FLIGHT_PER_SEQUENCE x the engine's sequences
    at once in flight (each task runs ray_data_async_batches_per_task() batches at once)."""
    asked = getattr(config, "max_concurrent_batches", 1)
    if sequences is None or "max_concurrent_batches" in config.model_fields_set:
        return asked
    rows_per_task = config.batch_size * ray_data_async_batches_per_task()
    return max(asked, math.ceil(IN_FLIGHT_PER_SEQUENCE * sequences / rows_per_task))


def usage(engines: dict[str, dict[str, Any]], builds: int, gpus_each: float) -> dict[str, Any]:
    """What the run's engines held, from each actor's start to its end (or now): engine-seconds
    and GPU-seconds; how many engines were built (a restarted actor's included); where each ran."""
    now = time.time()
    held = sum((state.get("ended") or now) - state["created"] for state in engines.values() if state.get("created"))
    placement = [
        {
            "engine": number,
            "host": state.get("host"),
            "node_id": state.get("node_id"),
            "gpu_ids": state.get("gpu_ids", []),
            "start_seconds": state.get("start_seconds"),
            # Where the engine tells: what its start did with the node's compile cache
            # (engines/compile_cache.py), the largest batch its CUDA graphs cover.
            **{key: state[key] for key in ("compile_cache", "cuda_graph_max_tokens") if state.get(key) is not None},
        }
        for number, state in enumerate(engines.values())
        if state.get("node_id")
    ]
    return {
        "engine_seconds": round(held, 1),
        "gpu_seconds": round(held * gpus_each, 1),
        "engine_starts": builds,
        "placement": placement,
    }


class EngineDiedError(RuntimeError):
    pass


def where_it_died(engine: dict[str, Any]) -> str:
    """Where an engine whose actor died had run, and whether its node is gone."""
    import ray

    node = engine.get("node_id")
    if not node:
        return "(its actor process ended)"
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    cause = "its actor process ended" if node in alive else "lost by the Ray cluster"
    return f"on Ray node {node} (host {engine.get('host')}, {cause})"


def actor_died(error: Optional[BaseException]):
    """The Ray actor death in an error's chain, if any."""
    import ray

    while error is not None:
        if isinstance(error, ray.exceptions.RayActorError) and error.actor_id:
            return error
        error = error.__cause__ or error.__context__
    return None


def settled_death(died) -> str:
    """Why an engine's actor died, once Ray has settled it: a task's error may only say the actor
    is unavailable, before Ray's health checks have marked its node lost (seconds to a minute)."""
    deadline = time.monotonic() + DEATH_SETTLES_S
    while time.monotonic() < deadline:
        cause = ray_actor_death(died.actor_id)
        if cause is not None:
            return " ".join(line.strip() for line in cause.splitlines() if line.strip())[:400]
        time.sleep(0.5)
    return [line.strip() for line in str(died).splitlines() if line.strip()][-1]
