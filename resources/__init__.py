"""Dagster resources: Ray Data execution, the vLLM engine pool, and partition storage."""

from __future__ import annotations

import os
from pathlib import Path

from resources.engine_pool import VLLMEnginePoolResource
from resources.ray_data import RayDataResource
from resources.storage import PartitionStorage

__all__ = ["PartitionStorage", "RayDataResource", "VLLMEnginePoolResource", "default_resources"]


def default_resources(home: Path) -> dict:
    """Embedded defaults: local Ray, outputs under ``home/storage``. Environment overrides:
    LLM_ASSETS_STORAGE (output root), LLM_ASSETS_RAY_ADDRESS (an existing Ray cluster)."""
    ray_data = RayDataResource(address=os.environ.get("LLM_ASSETS_RAY_ADDRESS") or None)
    return {
        "ray_data": ray_data,
        "storage": PartitionStorage(root=os.environ.get("LLM_ASSETS_STORAGE") or str(home / "storage")),
        "engine_pool": VLLMEnginePoolResource(ray_data=ray_data),
    }
