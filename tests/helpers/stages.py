"""Stages built as a pipeline builds them, for tests that call one stage on a table."""

from __future__ import annotations

from typing import Any, Callable, Optional

from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource


def preprocess_stage(fn: Optional[Callable] = None, config: Any = None, output_schema: Any = None, **settings: Any):
    """The Preprocess stage of a pipeline on ``config`` (a vLLM pipeline of ``settings`` by
    default: ``task_type="embed"``, ``prepare_multimodal_stage=True``...), with its row checks."""
    config = config if config is not None else {"model_source": "org/any-model", **settings}
    pipeline = LLMPipeline(
        "stage_test", config, LocalFolderSource("/nowhere"), preprocess=fn, output_schema=output_schema
    )
    plan = pipeline.plan("preprocess")
    return plan.udf(**plan.udf_kwargs)
