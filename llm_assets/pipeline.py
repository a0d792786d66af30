"""A pipeline: a name, a processor config, the user's pre/postprocess functions, and an input source.

Its stages, in order, are the ones ray.data.llm runs: Preprocess -> ChatTemplate -> Tokenize ->
Engine -> Detokenize -> Postprocess (ChatTemplate, Tokenize and Detokenize when enabled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from llm_assets import versions
from llm_assets.config import StageConfig, vLLMEngineProcessorConfig
from llm_assets.sources import LocalFolderSource, S3PrefixSource
from llm_assets.stages.chat_template import ChatTemplateStage
from llm_assets.stages.detokenize import DetokenizeStage
from llm_assets.stages.postprocess import PostprocessStage
from llm_assets.stages.preprocess import PreprocessStage
from llm_assets.stages.tokenize import TokenizeStage

RowFn = Callable[[dict[str, Any]], dict[str, Any]]
ENGINE = "engine"
# Stage asset name -> the processor config field that enables and configures it.
OPTIONAL_STAGES = {"chat_template": "chat_template_stage", "tokenize": "tokenize_stage", "detokenize": "detokenize_stage"}
STAGE_ORDER = ["preprocess", "chat_template", "tokenize", ENGINE, "detokenize", "postprocess"]


@dataclass(frozen=True)
class StagePlan:
    """How one stage runs: its UDF class and constructor kwargs, and Ray Data settings."""

    name: str
    upstream: Optional[str]
    udf: Optional[type]  # None for the engine stage (run by the engine pool)
    udf_kwargs: dict[str, Any]
    settings: StageConfig
    model_source: Optional[str] = None  # unresolved; the runner resolves it before starting


@dataclass
class LLMPipeline:
    name: str
    config: Union[vLLMEngineProcessorConfig, dict[str, Any]]
    source: Union[LocalFolderSource, S3PrefixSource]
    preprocess: Optional[RowFn] = None
    postprocess: Optional[RowFn] = None
    description: str = ""
    extra_tags: dict[str, str] = field(default_factory=dict)
    # The engine's error_rate check fails above this share of rows with an inference error (rows
    # fail only with should_continue_on_error=True; otherwise the step fails on the first one).
    max_error_rate: float = 0.01
    # The new-files sensor's interval, and whether it runs without being switched on in the UI.
    sensor_interval_s: int = 30
    sensor_running_by_default: bool = False
    # Also write each partition's results as OpenAI Batch output/error files under this local
    # folder or s3:// URI (the openai_batch_output asset).
    openai_batch_output: Optional[str] = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(f"pipeline name {self.name!r}: use letters, digits and underscores (it names assets and a job)")
        if isinstance(self.config, dict):
            self.config = vLLMEngineProcessorConfig(**self.config)
        if not isinstance(self.config, vLLMEngineProcessorConfig):
            raise TypeError(f"pipeline {self.name!r}: config must be a vLLMEngineProcessorConfig or a dict")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"pipeline {self.name!r}: max_error_rate is {self.max_error_rate!r}: expected a share between 0 and 1")

    def stage_names(self) -> list[str]:
        config = self.config
        return [
            name
            for name in STAGE_ORDER
            if name not in OPTIONAL_STAGES or config.stage(OPTIONAL_STAGES[name]).enabled
        ]

    def plan(self, stage: str) -> StagePlan:
        names = self.stage_names()
        upstream = names[names.index(stage) - 1] if names.index(stage) > 0 else None
        config = self.config
        if stage in OPTIONAL_STAGES:
            settings = config.stage(OPTIONAL_STAGES[stage])
            kwargs: dict[str, Any] = {}
            if stage == "chat_template":
                kwargs = {"chat_template": settings.chat_template, "chat_template_kwargs": settings.chat_template_kwargs}
            udf = {"chat_template": ChatTemplateStage, "tokenize": TokenizeStage, "detokenize": DetokenizeStage}[stage]
            return StagePlan(stage, upstream, udf, kwargs, settings, settings.model_source)
        settings = config.inherit(StageConfig())
        if stage == "preprocess":
            return StagePlan(stage, upstream, PreprocessStage, {"fn": self.preprocess}, settings)
        if stage == "postprocess":
            return StagePlan(stage, upstream, PostprocessStage, {"fn": self.postprocess}, settings)
        return StagePlan(stage, upstream, None, {}, settings, config.model_source)

    def code_version(self, stage: str) -> str:
        """A hash of everything that changes this stage's output (see llm_assets.versions)."""
        plan = self.plan(stage)
        parts: dict[str, Any] = {"stage": stage, "code": versions.module_source(plan.udf), "model": plan.model_source}
        # Cumulative: a stage's output depends on every stage before it. Dagster does not mark
        # downstream partitions of a changed partitioned asset stale on its own.
        parts["upstream"] = self.code_version(plan.upstream) if plan.upstream else None
        for name, value in plan.udf_kwargs.items():
            parts[name] = versions.function_fingerprint(value) if callable(value) else value
        if stage == ENGINE:
            from llm_assets.stages import vllm_engine

            config = self.config
            parts["code"] = versions.module_source(vllm_engine.vLLMEngineStage)
            parts["engine"] = {
                "engine_kwargs": config.engine_kwargs,
                "task_type": config.task_type,
                "should_continue_on_error": config.should_continue_on_error,
                "detokenize_stage": config.stage("detokenize_stage").enabled,
            }
        return versions.digest(parts)
