"""Dagster resources: Ray execution, the engine pool, and partition storage."""

from __future__ import annotations

import os
from pathlib import Path

from resources.engine_pool import EnginePoolResource
from resources.ray_data import RayDataResource
from resources.storage import PartitionStorage

__all__ = ["EnginePoolResource", "PartitionStorage", "RayDataResource", "default_resources", "make_resources"]


def make_resources(storage: PartitionStorage, ray_data: RayDataResource | None = None, **engine_pool_settings) -> dict:
    """The three resources a pipeline needs, built together (the engine pool depends on Ray's)."""
    ray_data = ray_data or RayDataResource()
    return {
        "ray_data": ray_data,
        "storage": storage,
        "engine_pool": EnginePoolResource(ray_data=ray_data, **engine_pool_settings),
    }


def default_resources(home: Path) -> dict:
    """Embedded defaults: local Ray, outputs under ``home/storage``. Environment overrides:
    LLM_ASSETS_STORAGE (output root), LLM_ASSETS_RAY_ADDRESS (an existing Ray cluster)."""
    return make_resources(
        PartitionStorage(root=os.environ.get("LLM_ASSETS_STORAGE") or str(home / "storage")),
        RayDataResource(address=os.environ.get("LLM_ASSETS_RAY_ADDRESS") or None),
    )
