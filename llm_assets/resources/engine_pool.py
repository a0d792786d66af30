"""The run's engines, as a Dagster resource: a thin wrapper over
``llm_assets.execution.engines.RunEngines`` (the engines' settings; the engine actors are the
run's, started and ended by Ray Data)."""

from __future__ import annotations

from typing import Optional

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field, PrivateAttr

from llm_assets.execution.engines import RunEngines
from llm_assets.resources.ray_data import RayDataResource


class EnginePoolResource(dg.ConfigurableResource):
    """Engine replicas for the pipelines a run executes (pool size: the processor's ``concurrency``)."""

    # A dependency, so that Dagster builds Ray's resource first; engines stop before Ray does.
    ray_data: RayDataResource
    num_cpus_per_engine: float = Field(default=1.0, description="Logical CPUs each engine actor reserves.")
    start_timeout_s: float = Field(default=1800.0, description="How long an engine may take to start.")
    max_engine_restarts: int = Field(
        default=3, ge=0, description="An engine actor that dies mid-run is restarted by Ray this many times, at most."
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
    _engines: Optional[RunEngines] = PrivateAttr(default=None)

    def engines(self) -> RunEngines:
        if self._engines is None:
            self._engines = RunEngines(
                self.ray_data.session(),
                self.num_cpus_per_engine,
                self.start_timeout_s,
                self.max_engine_restarts,
                self.model_s3,
                self.price_per_gpu_hour,
            )
        return self._engines
