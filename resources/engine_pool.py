"""The engine pool resource: a run's engine replicas, started once per run and shared by every
partition it streams (a single-run backfill loads the model once).

vLLM takes minutes to start on a GPU (~140 s for a 1B model on an H100: compile + CUDA graphs), so
the pool is owned by this resource, not by one stage: the streaming run asks for it when it
starts (the actors then import the engine library while the CPU stages run), builds it when the
first unit is ready for it, and releases it as soon as the engine stage has committed (the
engines begin to shut down; the run does not wait). The run's end collects the engines' shutdown
reports and ends their actors, before Ray is shut down. The pool logic itself is Dagster-free:
``llm_assets/engines/pool.py``.
"""

from __future__ import annotations

from typing import Callable, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from llm_assets.engines.pool import EnginePool
from resources.ray_data import RayDataResource, before_ray_shutdown
from resources.s3 import S3Resource


class EnginePoolResource(dg.ConfigurableResource):
    """Engine replicas for the pipelines a run executes (pool size: the processor's ``concurrency``)."""

    # A dependency, so that Dagster builds Ray's resource first; engines stop before Ray does.
    ray_data: RayDataResource
    num_cpus_per_engine: float = Field(default=1.0, description="Logical CPUs each engine actor reserves.")
    start_timeout_s: float = Field(default=1800.0, description="How long an engine may take to start.")
    max_engine_restarts: int = Field(
        default=3, ge=0, description="Engines that die mid-run are rebuilt this many times per run, at most."
    )
    model_s3: Optional[S3Resource] = Field(
        default=None,
        description="Endpoint, region and credentials for s3:// model sources (default: each node's AWS environment).",
    )
    price_per_gpu_hour: Optional[float] = Field(
        default=None,
        ge=0,
        description="What a GPU-hour costs (any currency): the engine stage's metadata then shows estimated_cost.",
    )
    _pools: list = PrivateAttr(default_factory=list)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.shutdown_engines()

    def pool_for(self, pipeline, target: str, log: Callable[[str], None]) -> EnginePool:
        """New engine actors for the pipeline (they import the engine library now; ``build()``
        starts the engines)."""
        self.ray_data.ensure_started()
        before_ray_shutdown(self.shutdown_engines)
        # Engines released by an earlier step of this run must be gone before new ones claim
        # their GPUs.
        for released in [p for p in self._pools if p.shutting_down]:
            self._pools.remove(released)
            released.shutdown()
        pool = EnginePool(
            pipeline.engine,
            target,
            pipeline.engine_detokenizes(),
            self.ray_data.cluster_gpus() > 0,
            self.num_cpus_per_engine,
            self.max_engine_restarts,
            log,
        )
        self._pools.append(pool)
        return pool

    def reservation(self, pipeline) -> dict[str, float]:
        """What the pipeline's engine pool holds for the whole run: CPUs and GPUs, in all and each."""
        self.ray_data.ensure_started()
        gpus = float(pipeline.engine.gpus_per_replica(self.ray_data.cluster_gpus() > 0))
        replicas = pipeline.config.engine_pool_size
        return {
            "CPU": self.num_cpus_per_engine * replicas,
            "GPU": gpus * replicas,
            "CPU_each": self.num_cpus_per_engine,
            "GPU_each": gpus,
        }

    def release(self, pool: EnginePool) -> None:
        """The run is done with the pool: its engines begin to shut down now, and the run goes on
        without waiting (vLLM waits seconds for its engine-core process); the resource's teardown
        collects their reports and ends the actors."""
        if pool in self._pools:
            pool.begin_shutdown()

    def shutdown_engines(self) -> None:
        """Stop every engine this resource started (idempotent; a no-op once Ray is gone)."""
        import ray

        pools, self._pools = self._pools, []
        if ray.is_initialized():
            for pool in pools:
                pool.shutdown()
