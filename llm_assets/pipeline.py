"""A pipeline: a name, a processor config, the user's pre/postprocess functions, and an input source.

Its stages, in order, are the ones ray.data.llm runs: Preprocess -> ChatTemplate -> Tokenize ->
Engine -> Detokenize -> Postprocess (ChatTemplate, Tokenize and Detokenize when enabled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from llm_assets.config import StageConfig, vLLMEngineProcessorConfig
from llm_assets.sources import LocalFolderSource
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
    source: LocalFolderSource
    preprocess: Optional[RowFn] = None
    postprocess: Optional[RowFn] = None
    description: str = ""
    extra_tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(f"pipeline name {self.name!r}: use letters, digits and underscores (it names assets and a job)")
        if isinstance(self.config, dict):
            self.config = vLLMEngineProcessorConfig(**self.config)
        if not isinstance(self.config, vLLMEngineProcessorConfig):
            raise TypeError(f"pipeline {self.name!r}: config must be a vLLMEngineProcessorConfig or a dict")

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
