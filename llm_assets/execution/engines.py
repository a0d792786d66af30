"""A run's engine pools: started once per run and shared by every partition it streams (a
single-run backfill loads the model once).

vLLM takes minutes to start on a GPU (~140 s for a 1B model on an H100: compile + CUDA graphs), so
the pools belong to the run, not to one stage: the streaming run asks for one when it starts (the
actors then import the engine library while the CPU stages run), builds it when the first unit is
ready for it, and releases it as soon as the engine stage has committed (the engines begin to shut
down; the run does not wait). The run's end collects the engines' shutdown reports and ends their
actors, before Ray is shut down. Imports no Dagster (``llm_assets.resources.EnginePoolResource``
is its Dagster resource).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from llm_assets.engines.pool import EnginePool
from llm_assets.ray_session import RaySession


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
        self.max_engine_restarts, self.model_s3, self.price_per_gpu_hour = (
            max_engine_restarts,
            model_s3,
            price_per_gpu_hour,
        )
        self._pools: list[EnginePool] = []

    def pool_for(self, pipeline, target: str, log: Callable[[str], None]) -> EnginePool:
        """New engine actors for the pipeline (they import the engine library now; ``build()``
        starts the engines)."""
        self.session.ensure_started()
        self.session.before_shutdown(self.shutdown_engines)
        # Engines released by an earlier step of this run must be gone before new ones claim their GPUs.
        for released in [p for p in self._pools if p.shutting_down]:
            self._pools.remove(released)
            released.shutdown()
        pool = EnginePool(
            pipeline.engine,
            target,
            pipeline.engine_detokenizes(),
            self.session.cluster_gpus() > 0,
            self.num_cpus_per_engine,
            self.max_engine_restarts,
            log,
        )
        self._pools.append(pool)
        return pool

    def reservation(self, pipeline) -> dict[str, float]:
        """What the pipeline's engine pool holds for the whole run: CPUs and GPUs, in all and each."""
        self.session.ensure_started()
        gpus = float(pipeline.engine.gpus_per_replica(self.session.cluster_gpus() > 0))
        replicas = pipeline.config.engine_pool_size
        return {
            "CPU": self.num_cpus_per_engine * replicas,
            "GPU": gpus * replicas,
            "CPU_each": self.num_cpus_per_engine,
            "GPU_each": gpus,
        }

    def release(self, pool: EnginePool) -> None:
        """The run is done with the pool: its engines begin to shut down now, and the run goes on
        without waiting (vLLM waits seconds for its engine-core process); ``shutdown_engines``
        collects their reports and ends the actors."""
        if pool in self._pools:
            pool.begin_shutdown()

    def shutdown_engines(self) -> None:
        """Stop every engine started for the run (idempotent; a no-op once Ray is gone)."""
        import ray

        pools, self._pools = self._pools, []
        if ray.is_initialized():
            for pool in pools:
                pool.shutdown()
