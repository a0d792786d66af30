"""Processor and stage configs, with the field names and defaults of ``ray.data.llm``.

A ray.data.llm user moves over by changing the import: ``vLLMEngineProcessorConfig(model_source=...,
engine_kwargs=..., concurrency=..., batch_size=..., chat_template_stage=..., ...)`` means the same
thing here. Unknown fields and wrong types fail when the config is built (so at definition load),
with pydantic's message naming the field.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Concurrency = Union[int, Tuple[int, int]]


class _StrictModel(BaseModel):
    # extra="forbid": a misspelt field is an error, never silently ignored.
    # hide_input_in_errors: a config error never echoes the values given (runtime_env may hold tokens).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, hide_input_in_errors=True)


def _check_concurrency(value: Optional[Concurrency]) -> Optional[Concurrency]:
    if value is None:
        return value
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"concurrency must be >= 1, got {value}")
        return value
    low, high = value
    if low < 1 or high < low:
        raise ValueError(f"concurrency (min, max) needs 1 <= min <= max, got {value}")
    return (low, high)


class StageConfig(_StrictModel):
    """Per-stage settings. Unset fields inherit the processor's (batch_size, concurrency,
    runtime_env, model_source) or the stage's own default (num_cpus, memory)."""

    enabled: bool = True
    batch_size: Optional[int] = Field(default=None, ge=1)
    concurrency: Optional[Concurrency] = None
    num_cpus: Optional[float] = Field(default=None, ge=0)
    memory: Optional[float] = Field(default=None, ge=0, description="Heap bytes per worker.")
    runtime_env: Optional[dict[str, Any]] = None

    @field_validator("concurrency")
    @classmethod
    def _valid_concurrency(cls, value):
        return _check_concurrency(value)


class ChatTemplateStageConfig(StageConfig):
    model_source: Optional[str] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class TokenizerStageConfig(StageConfig):
    model_source: Optional[str] = None


class DetokenizeStageConfig(StageConfig):
    model_source: Optional[str] = None


class PrepareMultimodalStageConfig(StageConfig):
    model_source: Optional[str] = None
    chat_template_content_format: Literal["string", "openai"] = "string"


StageValue = Union[bool, dict, StageConfig]

# Processor field -> the config class its value is parsed into.
STAGE_CONFIG_CLASSES: dict[str, type[StageConfig]] = {
    "prepare_multimodal_stage": PrepareMultimodalStageConfig,
    "chat_template_stage": ChatTemplateStageConfig,
    "tokenize_stage": TokenizerStageConfig,
    "detokenize_stage": DetokenizeStageConfig,
}

# CPU stages are light; a fraction of a logical CPU each keeps actor pools from reserving
# every CPU of a small machine (which deadlocks the read/write tasks that need one too).
DEFAULT_STAGE_NUM_CPUS = 0.5


class vLLMEngineProcessorConfig(_StrictModel):
    """The configuration of a vLLM-backed pipeline (same fields as ray.data.llm's)."""

    model_source: str = Field(description="Local model folder, .gguf file, or Hugging Face repo id.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    task_type: Literal["generate"] = "generate"
    concurrency: Concurrency = 1
    batch_size: int = Field(default=32, ge=1)
    max_concurrent_batches: int = Field(default=8, ge=1)
    max_pending_requests: Optional[int] = Field(default=None, ge=1)
    should_continue_on_error: bool = False
    runtime_env: Optional[dict[str, Any]] = None
    accelerator_type: Optional[str] = None
    chat_template_stage: StageValue = True
    tokenize_stage: StageValue = True
    detokenize_stage: StageValue = True
    prepare_multimodal_stage: StageValue = False

    @field_validator("concurrency")
    @classmethod
    def _valid_concurrency(cls, value):
        return _check_concurrency(value)

    @model_validator(mode="after")
    def _resolve_stages(self) -> "vLLMEngineProcessorConfig":
        # Parse every stage value now, so a bad stage field fails at definition load.
        for name in STAGE_CONFIG_CLASSES:
            self.stage(name)
        if self.stage("prepare_multimodal_stage").enabled:
            raise ValueError(
                "prepare_multimodal_stage: multimodal inputs are not supported yet "
                "(see the README's limits); leave it disabled"
            )
        return self

    @property
    def engine_pool_size(self) -> int:
        """The engine pool is fixed-size: a (min, max) concurrency means max engines."""
        return self.concurrency if isinstance(self.concurrency, int) else self.concurrency[1]

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine_kwargs.get("tensor_parallel_size", 1))

    @property
    def pipeline_parallel_size(self) -> int:
        return int(self.engine_kwargs.get("pipeline_parallel_size", 1))

    def stage(self, name: str) -> StageConfig:
        """The stage's config with unset fields inherited from the processor."""
        cls = STAGE_CONFIG_CLASSES[name]
        value = getattr(self, name)
        if isinstance(value, bool):
            resolved = cls(enabled=value)
        elif isinstance(value, dict):
            try:
                resolved = cls(**value)
            except Exception as exc:  # re-raise naming the stage, not just the inner field
                raise ValueError(f"{name}: {exc}") from exc
        elif isinstance(value, StageConfig):
            resolved = cls.model_validate(value.model_dump(exclude_unset=True))
        else:
            raise ValueError(f"{name}: expected bool, dict or {cls.__name__}, got {type(value).__name__}")
        return self.inherit(resolved)

    def inherit(self, settings: StageConfig) -> StageConfig:
        """Fill the stage settings left unset from the processor's (and the stage default num_cpus)."""
        inherited = {
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,
            "runtime_env": self.runtime_env,
            "model_source": self.model_source,
            "num_cpus": DEFAULT_STAGE_NUM_CPUS,
        }
        for field, default in inherited.items():
            if field in type(settings).model_fields and getattr(settings, field) is None:
                setattr(settings, field, default)
        return settings
