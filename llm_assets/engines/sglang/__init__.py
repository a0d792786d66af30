"""SGLang: the processor config (ray.data.llm's ``SGLangEngineProcessorConfig``) and its engine (``SGLangEngine``).

The replica (``replica.py``) is one ``sglang.Engine`` per engine actor, fed token ids by the
Tokenize stage; the Detokenize stage turns its token ids into text, so the engine runs without a
tokenizer (``skip_tokenizer_init=True``, ray.data.llm's default) unless one of those stages is
off. Rows' ``sampling_params`` use vLLM's names or SGLang's (``params.py``). SGLang runs on
NVIDIA GPUs only: a run whose Ray cluster has none fails at its start, saying so.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, field_validator, model_validator

from llm_assets.config import OfflineProcessorConfig
from llm_assets.engines.base import Engine, engine_kwarg_int
from llm_assets.engines.sglang.params import check_row_params

# ray.data.llm's defaults for the engine's own settings.
DEFAULT_ENGINE_KWARGS = {"tp_size": 1, "dp_size": 1, "skip_tokenizer_init": True}


class SGLangEngineProcessorConfig(OfflineProcessorConfig):
    """The configuration of an SGLang-backed pipeline (ray.data.llm's fields; ``engine_kwargs``
    are ``sglang.Engine``'s, e.g. ``tp_size``, ``context_length``, ``mem_fraction_static``).
    ``should_continue_on_error`` is honoured (ray.data.llm drops it for SGLang)."""

    engine_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("task_type")
    @classmethod
    def _generate_only(cls, value: str) -> str:
        if value != "generate":
            raise ValueError(
                f"task_type {value!r}: the SGLang engine runs 'generate' only "
                f"(use vLLMEngineProcessorConfig for {value!r})"
            )
        return value

    @field_validator("engine_kwargs")
    @classmethod
    def _no_model(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in ("model_path", "model"):
            if name in value:
                raise ValueError(f"engine_kwargs.{name}: the model is model_source; remove it from engine_kwargs")
        return value

    @model_validator(mode="after")
    def _no_multimodal(self):
        # The SGLang replica sends token ids only; media would be dropped without a word.
        if self.stage("prepare_multimodal_stage").enabled:
            raise ValueError(
                "prepare_multimodal_stage: multimodal rows run on vLLMEngineProcessorConfig only (not SGLang)"
            )
        return self

    def resolved_engine_kwargs(self) -> dict[str, Any]:
        """``engine_kwargs`` over ray.data.llm's defaults; without a Tokenize or Detokenize stage
        the engine needs its tokenizer (text in or out), so it keeps it unless told otherwise."""
        defaults = dict(DEFAULT_ENGINE_KWARGS)
        if not (self.stage("tokenize_stage").enabled and self.stage("detokenize_stage").enabled):
            defaults["skip_tokenizer_init"] = False
        return {**defaults, **self.engine_kwargs}

    @property
    def gpus_per_replica(self) -> int:
        kwargs = self.resolved_engine_kwargs()
        return int(kwargs["tp_size"]) * int(kwargs["dp_size"]) * int(kwargs.get("pp_size", 1))


class SGLangEngine(Engine):
    label = "SGLang"
    config_class = SGLangEngineProcessorConfig
    replica = "llm_assets.engines.sglang.replica:SGLangEngineReplica"
    distributions = ("sglang",)
    code_modules = ("llm_assets.engines.base", "llm_assets.engines.sglang.replica", "llm_assets.engines.sglang.params")
    config: SGLangEngineProcessorConfig

    def sequences_at_once(self, on_gpu: bool) -> Optional[int]:
        from llm_assets.engines.sglang.replica import DEFAULT_RUNNING_REQUESTS

        return int(self.config.engine_kwargs.get("max_running_requests") or DEFAULT_RUNNING_REQUESTS)

    def replica_kwargs(self, target: str, on_gpu: bool, engine_detokenizes: bool) -> dict[str, Any]:
        if not on_gpu:
            raise RuntimeError(
                "the SGLang engine runs on NVIDIA GPUs only, and this run's Ray cluster has no GPU; "
                "use vLLMEngineProcessorConfig to run on CPUs"
            )
        config = self.config
        return dict(
            model_source=target,
            engine_kwargs=config.resolved_engine_kwargs(),
            should_continue_on_error=config.should_continue_on_error,
            engine_detokenizes=engine_detokenizes,
            max_pending_requests=config.max_pending_requests,
        )

    def gpus_per_replica(self, on_gpu: bool) -> float:
        return self.config.gpus_per_replica if on_gpu else 0

    def preimport(self, on_gpu: bool) -> None:
        if on_gpu:  # seconds of imports, overlapped with the CPU stages
            import importlib

            importlib.import_module("sglang.srt.entrypoints.engine")

    def output_settings(self) -> dict[str, Any]:
        return {
            "engine_kwargs": self.config.resolved_engine_kwargs(),
            "should_continue_on_error": self.config.should_continue_on_error,
        }

    def max_prompt_tokens(self) -> Optional[int]:
        return engine_kwarg_int(self.config, "context_length")

    def check_sampling_params(self, params: dict[str, Any]) -> None:
        check_row_params(params, text_in_engine=not self.config.resolved_engine_kwargs()["skip_tokenizer_init"])
