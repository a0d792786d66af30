"""The Dagster resources the library provides, thin wrappers over plain classes: where stage outputs
live (``PartitionStorage`` over ``llm_assets.storage.PartitionStore``), the run's Ray
(``RayDataResource`` over ``llm_assets.ray_session.RaySession``) and its engine pools
(``EnginePoolResource`` over ``llm_assets.execution.engines.RunEngines``)."""

from __future__ import annotations

from llm_assets.resources.engine_pool import EnginePoolResource
from llm_assets.resources.ray_data import RayDataResource
from llm_assets.resources.storage import PartitionStorage

__all__ = ["EnginePoolResource", "PartitionStorage", "RayDataResource", "make_resources"]


def make_resources(storage: PartitionStorage, ray_data: RayDataResource | None = None, **engine_pool_settings) -> dict:
    """The three resources a pipeline needs, built together (the engine pool depends on Ray's)."""
    ray_data = ray_data or RayDataResource()
    return {
        "ray_data": ray_data,
        "storage": storage,
        "engine_pool": EnginePoolResource(ray_data=ray_data, **engine_pool_settings),
    }
