"""Where models are kept on each node (converted GGUF files, S3 downloads), and the error a model
source that cannot be used raises. Shared by ``models.py`` and ``model_store.py``."""

from __future__ import annotations

import os
from pathlib import Path

# Written last into a converted or downloaded model folder: the folder is complete.
DONE_MARKER = ".llm_assets_converted"


class ModelSourceError(ValueError):
    pass


def model_cache_dir() -> Path:
    return Path(os.environ.get("LLM_ASSETS_MODEL_CACHE", "~/.cache/llm_assets/models")).expanduser()
