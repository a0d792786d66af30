"""A pipeline: a name, a processor config, the user's pre/postprocess functions, and an input source.

Its stage plan comes from one place, :meth:`LLMPipeline.plan`: the task type (``config.task_type``,
``llm_assets/tasks/``) lists the stages in order, the processor config enables the optional ones
and gives each its settings, the engine registry (``llm_assets/engines/``) says which engine runs
the engine stage.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional, Union

from pydantic import ValidationError

from llm_assets import versions
from llm_assets.config import OfflineProcessorConfig, StageConfig, one_line
from llm_assets.engines import ENGINES, Engine, engine_for
from llm_assets.sources import LocalFolderSource, S3PrefixSource
from llm_assets.stages import OPTIONAL_STAGES, STAGES
from llm_assets.tasks import ENGINE, TASKS, TaskType
from llm_assets.tasks.requests import RowContext
from llm_assets.tasks.structured import json_schema

RowFn = Callable[[dict[str, Any]], dict[str, Any]]
# Modules every CPU stage's output depends on besides its own.
SHARED_STAGE_MODULES = ("llm_assets.rows", "llm_assets.stages.base", "llm_assets.stages.tokenizer")
# The response cache's modes (execution/cache.py): which requests it answers.
CACHE_MODES = ("deterministic", "all", "off")


@dataclass(frozen=True)
class RowChecks:
    """Preprocess's check of a row: the task's, within the engine's (an engine taking requests of
    its own shape checks those instead). Picklable: it travels to the Ray workers."""

    task: TaskType
    context: RowContext

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.context.engine.check_row(row, functools.partial(self.task.check_row, context=self.context))

    def fingerprint(self) -> str:
        """What changes these checks (part of Preprocess's code version): their code, the task,
        the engine's settings, the pipeline's output schema and whether it reads media."""
        engine = self.context.engine
        modules = [
            "llm_assets.tasks.requests",
            "llm_assets.tasks.structured",
            type(self.task).__module__,
            type(engine).__module__,
        ]
        return versions.digest(
            {
                "code": [versions.module_code(name) for name in dict.fromkeys(modules)],
                "task": self.task.name,
                "engine": [engine.label, engine.output_settings()],
                "multimodal": self.context.multimodal,
                "output_schema": self.context.output_schema,
            }
        )


class ModelPathError(ValueError):
    """A local model path that is not a model; ``setting`` names the config field
    (``model_source``, ``tokenize_stage.model_source``...)."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class StagePlan:
    """How one stage runs: its UDF class and constructor kwargs (None for the engine), and settings."""

    name: str
    upstream: Optional[str]
    udf: Optional[type]
    udf_kwargs: dict[str, Any]
    settings: StageConfig
    model_source: Optional[str] = None  # unresolved; the run resolves it before starting


@dataclass
class LLMPipeline:
    name: str
    config: Union[OfflineProcessorConfig, dict[str, Any]]
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
    # A pydantic model: every row that sets no ``sampling_params.structured_outputs`` generates
    # JSON of the model's schema, and the text stage's ``schema_valid`` check parses each row.
    output_schema: Optional[type] = None
    # The response cache (execution/cache.py): "deterministic" requests only (greedy, a fixed
    # seed, embeddings), "all", or "off". Answers are reused across partitions and runs.
    response_cache: str = "deterministic"
    # The Dagster concurrency pool of which every run of the stages holds a slot while it is
    # active, so that the instance's limit on the pool caps the engine pools built at once
    # (README "GPU limits").
    # Pipelines on the same GPUs share a pool; None: no limit. An engine that holds no GPU of the
    # run (an HTTP endpoint, a Serve deployment) takes no slot whatever this says.
    gpu_pool: Optional[str] = "llm_assets/gpu"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(
                f"pipeline name {self.name!r}: use letters, digits and underscores (it names assets and a job)"
            )
        if isinstance(self.config, dict):
            # A dict means vLLM, the default engine (as ray.data.llm's examples use it).
            from llm_assets.engines.vllm import vLLMEngineProcessorConfig

            try:
                self.config = vLLMEngineProcessorConfig(**self.config)
            except ValidationError as exc:  # one line, not pydantic's block and a traceback
                raise ValueError(f"pipeline {self.name!r}: {one_line(exc)}") from None
        if self.openai_batch_output and "should_continue_on_error" not in self.config.model_fields_set:
            # An OpenAI Batch user expects a failed request in the error file, not a failed batch.
            self.config.should_continue_on_error = True
        if type(self.config) not in ENGINES:
            known = ", ".join(cls.__name__ for cls in ENGINES)
            raise TypeError(f"pipeline {self.name!r}: config must be one of {known} (or a dict of vLLM settings)")
        if self.task.text_column is None and self.output_schema is not None:
            raise ValueError(
                f"pipeline {self.name!r}: task_type {self.config.task_type!r} generates no text: "
                "output_schema does not apply"
            )
        if self.output_schema is not None:
            self.output_json_schema  # a clear error at definition load for anything but a pydantic model
            if self.engine.model_source() is None:
                raise ValueError(
                    f"pipeline {self.name!r}: output_schema constrains a model engine's sampling; with "
                    f"{type(self.config).__name__} put the endpoint's response_format in the payload"
                )
        if self.response_cache not in CACHE_MODES:
            raise ValueError(
                f"pipeline {self.name!r}: response_cache is {self.response_cache!r}: "
                f"expected one of {', '.join(CACHE_MODES)}"
            )
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(
                f"pipeline {self.name!r}: max_error_rate is {self.max_error_rate!r}: expected a share between 0 and 1"
            )

    def check_model_paths(self) -> None:
        """Every local ``model_source`` the pipeline names (the processor's, a stage's own) is a
        model folder or a .gguf file: checked when definitions load, so a wrong path fails
        ``dg check defs`` instead of a run. A hub repo id or an S3 URI is checked by the run."""
        from llm_assets.models import check_local_model_source

        settings = {"model_source": self.engine.model_source()}
        for field_name in OPTIONAL_STAGES.values():
            if field_name in type(self.config).model_fields:
                value = getattr(self.config, field_name)
                given = value.get("model_source") if isinstance(value, dict) else getattr(value, "model_source", None)
                settings[f"{field_name}.model_source"] = given
        for setting, source in settings.items():
            if source:
                try:
                    check_local_model_source(source, setting)
                except ValueError as exc:
                    raise ModelPathError(setting, f"pipeline {self.name!r}: {exc}") from None

    @property
    def task(self) -> TaskType:
        return TASKS[self.config.task_type]

    @property
    def engine(self) -> Engine:
        return engine_for(self.config)

    def stage_names(self) -> list[str]:
        return [
            name for name in self.task.stages if name not in OPTIONAL_STAGES or self._enabled(OPTIONAL_STAGES[name])
        ]

    def _enabled(self, field_name: str) -> bool:
        stage = field_name.removesuffix("_stage")
        if stage in self.task.off_by_default and field_name not in self.config.model_fields_set:
            return False
        return self.config.stage(field_name).enabled

    @cached_property
    def output_json_schema(self) -> Optional[dict[str, Any]]:
        """The JSON schema of ``output_schema`` (None without one)."""
        return json_schema(self.output_schema) if self.output_schema is not None else None

    @cached_property
    def _plans(self) -> dict[str, StagePlan]:
        plans: dict[str, StagePlan] = {}
        upstream = None
        for name in self.stage_names():
            plans[name] = self._plan(name, upstream)
            upstream = name
        return plans

    def plan(self, stage: str) -> StagePlan:
        return self._plans[stage]

    def _plan(self, stage: str, upstream: Optional[str]) -> StagePlan:
        config = self.config
        settings = config.stage(OPTIONAL_STAGES[stage]) if stage in OPTIONAL_STAGES else config.inherit(StageConfig())
        if stage == ENGINE:
            return StagePlan(stage, upstream, None, {}, settings, self.engine.model_source())
        udf = STAGES[stage]
        kwargs: dict[str, Any] = {name: getattr(settings, name) for name in getattr(udf, "CONFIG_KWARGS", ())}
        if getattr(udf, "USER_FN", None):
            kwargs["fn"] = getattr(self, udf.USER_FN)
        context = RowContext(
            self.engine, multimodal="prepare_multimodal" in self.stage_names(), output_schema=self.output_json_schema
        )
        processor = {
            "max_prompt_tokens": self.engine.max_prompt_tokens(),
            "should_continue_on_error": config.should_continue_on_error,
            "check_row": RowChecks(self.task, context),
            "pair": self.task.tokenize_pair,
        }
        kwargs.update({name: processor[name] for name in getattr(udf, "PROCESSOR_KWARGS", ())})
        uses_model = "model_source" in inspect.signature(udf.__init__).parameters
        return StagePlan(
            stage, upstream, udf, kwargs, settings, getattr(settings, "model_source", None) if uses_model else None
        )

    def text_stage(self) -> str:
        """The first stage whose output has the task's text column (generated_text)."""
        return "detokenize" if "detokenize" in self.stage_names() else ENGINE

    def engine_detokenizes(self) -> bool:
        """Without a Detokenize stage, the engine writes generated_text itself."""
        return "detokenize" not in self.stage_names()

    def engine_identity(self) -> dict[str, Any]:
        """What changes the engine's answer to a request besides the model: its code, library and
        output settings (part of the engine stage's code version and of the response cache's scope)."""
        engine = self.engine
        return {
            "code": [versions.module_code(name) for name in engine.code_modules],
            "library": engine.library_version(),
            "engine": {
                **engine.output_settings(),
                "task_type": self.config.task_type,
                "engine_detokenizes": self.engine_detokenizes(),
            },
        }

    def code_version(self, stage: str) -> str:
        """A hash of everything that changes this stage's output (see llm_assets.versions)."""
        plan = self.plan(stage)
        parts: dict[str, Any] = {"stage": stage, "model": plan.model_source}
        # Cumulative: a stage's output depends on every stage before it. Dagster does not mark
        # downstream partitions of a changed partitioned asset stale on its own.
        parts["upstream"] = self.code_version(plan.upstream) if plan.upstream else None
        if stage == ENGINE:
            parts.update(self.engine_identity())
        else:
            parts["code"] = [versions.module_code(name) for name in (plan.udf.__module__, *SHARED_STAGE_MODULES)]
            for name, value in plan.udf_kwargs.items():
                parts[name] = versions.function_fingerprint(value) if callable(value) else value
        return versions.digest(parts)
