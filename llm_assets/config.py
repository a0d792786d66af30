"""Processor and stage configs, with the class names, field names and defaults of ``ray.data.llm``.

A ray.data.llm user moves over by changing the import: ``vLLMEngineProcessorConfig(model_source=...,
engine_kwargs=..., concurrency=..., batch_size=..., chat_template_stage=..., ...)`` means the same
thing here. Unknown fields and wrong types fail when the config is built (so at definition load),
with pydantic's message naming the field.

The base classes are here (``ProcessorConfig``, ``OfflineProcessorConfig``, the stage configs); each
engine's own config class lives with its engine under ``llm_assets/engines/``, and every one is
importable from the package, as from ray.data.llm (``from llm_assets import vLLMEngineProcessorConfig``).
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Concurrency = Union[int, Tuple[int, int]]


class _StrictModel(BaseModel):
    # extra="forbid": a misspelt field is an error, never silently ignored.
    # hide_input_in_errors: a config error never echoes the values given (runtime_env may hold tokens).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, hide_input_in_errors=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        """A misspelt field is named with the closest valid one, in one line."""
        if isinstance(data, dict):
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                raise ValueError(
                    f"{cls.__name__} has no field "
                    f"{'; no field '.join(_with_hint(key, cls.model_fields) for key in unknown)}"
                )
        return data


def one_line(exc: ValidationError) -> str:
    """pydantic's errors as one line: ``field: problem; field: problem``."""
    problems = []
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        message = str(cause) if cause is not None else error["msg"]
        where = ".".join(map(str, error["loc"]))
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _with_hint(name: str, fields) -> str:
    close = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.6)
    return f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else f" (fields: {', '.join(fields)})")


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


def max_concurrency(value: Optional[Concurrency]) -> Optional[int]:
    """The upper bound of an int or (min, max) concurrency; None when unset."""
    if value is None:
        return None
    return value if isinstance(value, int) else value[1]


class StageConfig(_StrictModel):
    """Per-stage settings. Unset fields inherit the processor's (batch_size, runtime_env,
    model_source) or the stage defaults: ``num_cpus`` 0.5, ``concurrency`` as many tasks as the
    cluster's CPUs run (not the engine count: CPU stages are not tied to the engines)."""

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
    """ray.data.llm's fields: ``model_config_kwargs`` for vLLM's ``ModelConfig`` that parses the
    messages (``limit_mm_per_prompt``, ``mm_processor_kwargs``...; the model is the processor's),
    how the chat template wants media in the content (``"string"``: placeholders in the text;
    ``"openai"``: content parts), and whether system messages stay plain strings."""

    model_source: Optional[str] = None
    model_config_kwargs: Optional[dict[str, Any]] = None
    chat_template_content_format: Literal["string", "openai"] = "string"
    apply_sys_msg_formatting: bool = False


StageValue = Union[bool, dict, StageConfig]

# Processor field -> the config class its value is parsed into.
STAGE_CONFIG_CLASSES: dict[str, type[StageConfig]] = {
    "prepare_multimodal_stage": PrepareMultimodalStageConfig,
    "chat_template_stage": ChatTemplateStageConfig,
    "tokenize_stage": TokenizerStageConfig,
    "detokenize_stage": DetokenizeStageConfig,
}

# CPU stages are light; a fraction of a logical CPU each keeps them from reserving every CPU of
# a small machine (the engine actor needs one too).
DEFAULT_STAGE_NUM_CPUS = 0.5


class ProcessorConfig(_StrictModel):
    """What every processor has (ray.data.llm's ``ProcessorConfig``)."""

    batch_size: int = Field(default=32, ge=1, description="Rows per batch a stage processes at once.")
    accelerator_type: Optional[str] = None
    concurrency: Concurrency = Field(default=1, description="Engine replicas (a fixed pool: (min, max) means max).")

    @field_validator("concurrency")
    @classmethod
    def _valid_concurrency(cls, value):
        return _check_concurrency(value)

    @property
    def engine_pool_size(self) -> int:
        return max_concurrency(self.concurrency)  # type: ignore[return-value]

    def stage(self, name: str) -> StageConfig:
        """A processor without the stage's field (the HTTP one, say) runs without that stage."""
        return self.inherit(STAGE_CONFIG_CLASSES[name](enabled=False))

    def inherit(self, settings: StageConfig) -> StageConfig:
        """Fill the stage settings left unset from the processor's (and the stage defaults)."""
        inherited = {
            "batch_size": self.batch_size,
            "runtime_env": getattr(self, "runtime_env", None),
            "model_source": getattr(self, "model_source", None),
            "num_cpus": DEFAULT_STAGE_NUM_CPUS,
        }
        for field, default in inherited.items():
            if field in type(settings).model_fields and getattr(settings, field) is None:
                setattr(settings, field, default)
        return settings


class OfflineProcessorConfig(ProcessorConfig):
    """A processor whose engine runs inside the run's Ray cluster (ray.data.llm's
    ``OfflineProcessorConfig``): a model, stage settings, error handling."""

    model_source: str = Field(
        description="Local model folder, .gguf file, s3://bucket/prefix folder, or Hugging Face repo id."
    )
    task_type: str = "generate"
    runtime_env: Optional[dict[str, Any]] = None
    max_pending_requests: Optional[int] = Field(default=None, ge=1)
    max_concurrent_batches: int = Field(
        default=8,
        ge=1,
        description="Ray Data tasks an engine actor runs at once (each runs 4 batches). Unset: at least 8, "
        "and enough to keep three times the engine's max_num_seqs rows in flight.",
    )
    max_tasks_in_flight_per_actor: Optional[int] = Field(
        default=None,
        ge=1,
        description="Batches Ray Data hands each engine actor at once (ray.data.llm's field, passed to "
        "ActorPoolStrategy). Unset: Ray Data's default, twice max_concurrent_batches.",
    )
    should_continue_on_error: bool = False
    chat_template_stage: StageValue = True
    tokenize_stage: StageValue = True
    detokenize_stage: StageValue = True
    prepare_multimodal_stage: StageValue = False

    @field_validator("task_type")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from llm_assets.tasks import TASKS

        if value not in TASKS:
            raise ValueError(f"task_type {value!r} is not supported: expected one of {sorted(TASKS)}")
        return value

    @model_validator(mode="after")
    def _resolve_stages(self):
        # Parse every stage value now, so a bad stage field fails at definition load.
        for name in STAGE_CONFIG_CLASSES:
            self.stage(name)
        if self.stage("prepare_multimodal_stage").enabled:
            # The stage's placeholders become prompt text only through the chat template.
            if not self.stage("chat_template_stage").enabled:
                raise ValueError(
                    "prepare_multimodal_stage needs chat_template_stage: media placeholders reach the prompt "
                    "through the chat template; enable it"
                )
            if self.task_type != "generate":
                raise ValueError(
                    f"prepare_multimodal_stage runs with task_type 'generate' only (got {self.task_type!r})"
                )
        return self

    def stage(self, name: str) -> StageConfig:
        """The stage's config with unset fields inherited from the processor."""
        cls = STAGE_CONFIG_CLASSES[name]
        value = getattr(self, name)
        if isinstance(value, bool):
            resolved = cls(enabled=value)
        elif isinstance(value, dict):
            try:
                resolved = cls(**value)
            except ValidationError as exc:  # re-raise naming the stage, not just the inner field
                raise ValueError(f"{name}: {one_line(exc)}") from None
        elif isinstance(value, StageConfig):
            resolved = cls.model_validate(value.model_dump(exclude_unset=True))
        else:
            raise ValueError(f"{name}: expected bool, dict or {cls.__name__}, got {type(value).__name__}")
        return self.inherit(resolved)
