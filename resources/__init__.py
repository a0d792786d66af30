"""This code location's resources (the repository's own wiring, not part of the installed library):
the embedded defaults, with environment overrides."""

from __future__ import annotations

import os
from pathlib import Path

from llm_assets.resources import PartitionStorage, RayDataResource, make_resources


def default_resources(home: Path) -> dict:
    """Embedded defaults: local Ray, outputs under ``home/storage``. Environment overrides:
    LLM_ASSETS_STORAGE (output root), LLM_ASSETS_RAY_ADDRESS (an existing Ray cluster),
    LLM_ASSETS_RAY_LOG_TO_DRIVER=0 (the Ray workers' own output, vLLM's log, stays in Ray's logs)."""
    return make_resources(
        PartitionStorage(root=os.environ.get("LLM_ASSETS_STORAGE") or str(home / "storage")),
        RayDataResource(
            address=os.environ.get("LLM_ASSETS_RAY_ADDRESS") or None,
            log_to_driver=os.environ.get("LLM_ASSETS_RAY_LOG_TO_DRIVER", "1") != "0",
        ),
    )
