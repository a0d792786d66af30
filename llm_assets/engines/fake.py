"""A fake engine for tests: pipelines, row functions and orchestration (sensors, partitions,
commits, resume, restarts) run through every stage and the engine pool without vLLM.

``FakeEngineProcessorConfig(model_source=<a model folder with a tokenizer>, ...)`` takes a vLLM
config's fields and answers each row at once, deterministically: its generated tokens depend only
on the prompt's tokens and ``max_tokens`` (16 unless the row says, as vLLM's default), drawn from
the model's vocabulary past its first three ids (so Detokenize reads text). It refuses what vLLM
refuses (a prompt past ``engine_kwargs["max_model_len"]``, ``n`` other than 1, a ``top_p`` outside
(0, 1], a ``temperature`` below 0), as a failed row. ``embed``, ``classify`` and ``score`` rows get
a deterministic vector. ``start_delay_s`` holds the engine's start and ``batch_delay_s`` each
batch, one batch after the other (as one engine loop works), so a test can kill a run while it is
under way. It imports no engine library and needs no
GPU; what it computes is noise: test what a pipeline does with answers, not the answers.

    from llm_assets.engines.fake import FakeEngineProcessorConfig
    pipeline = LLMPipeline("reviews", FakeEngineProcessorConfig(model_source=folder, batch_size=8), source, ...)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
from pydantic import Field

from llm_assets.config import OfflineProcessorConfig
from llm_assets.engines.base import Engine, engine_kwarg_int, generation_columns, no_result, replica_info, with_results
from llm_assets.rows import ROW_ID, RowError, column_or_none, loads_params, ok_rows

DEFAULT_MAX_TOKENS = 16  # vLLM's
VECTOR_SIZE = 8
FIRST_TOKEN_ID = 3  # past the special tokens a small tokenizer starts with
MAX_NUM_SEQS = 256


class FakeEngineProcessorConfig(OfflineProcessorConfig):
    """A vLLM-shaped config for the fake engine; ``engine_kwargs`` may set ``max_model_len``."""

    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    start_delay_s: float = Field(default=0.0, ge=0, description="How long each engine takes to start.")
    batch_delay_s: float = Field(
        default=0.0, ge=0, description="How long each batch takes, before its rows are answered."
    )


class FakeEngine(Engine):
    label = "Fake"
    config_class = FakeEngineProcessorConfig
    replica = "llm_assets.engines.fake:FakeEngineReplica"
    distributions = ("llm_assets",)
    code_modules = ("llm_assets.engines.base", "llm_assets.engines.fake")
    config: FakeEngineProcessorConfig

    def replica_kwargs(self, target: str, on_gpu: bool, engine_detokenizes: bool) -> dict[str, Any]:
        config = self.config
        return dict(
            model_source=target,
            max_model_len=self.max_prompt_tokens(),
            task_type=config.task_type,
            should_continue_on_error=config.should_continue_on_error,
            engine_detokenizes=engine_detokenizes,
            start_delay_s=config.start_delay_s,
            batch_delay_s=config.batch_delay_s,
        )

    def output_settings(self) -> dict[str, Any]:
        return {
            "engine_kwargs": self.config.engine_kwargs,
            "should_continue_on_error": self.config.should_continue_on_error,
        }

    def max_prompt_tokens(self) -> Optional[int]:
        return engine_kwarg_int(self.config, "max_model_len")


class FakeEngineReplica:
    def __init__(
        self,
        model_source: str,
        max_model_len: Optional[int] = None,
        task_type: str = "generate",
        should_continue_on_error: bool = False,
        engine_detokenizes: bool = True,
        start_delay_s: float = 0.0,
        batch_delay_s: float = 0.0,
    ):
        started = time.perf_counter()
        time.sleep(start_delay_s)
        self.max_model_len, self.task_type = max_model_len, task_type
        self.should_continue_on_error, self.batch_delay_s = should_continue_on_error, batch_delay_s
        self.vocab_size = _vocab_size(model_source)
        # Text out only where no Detokenize stage follows (a raw prompt in, say).
        self.tokenizer = None if not engine_detokenizes or task_type != "generate" else _tokenizer(model_source)
        self.request_ids = itertools.count()
        self.start_seconds = time.perf_counter() - started

    def fatal_errors(self) -> tuple[type[BaseException], ...]:
        return ()

    def info(self) -> dict[str, Any]:
        return replica_info(self.start_seconds, MAX_NUM_SEQS)

    async def process(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        if self.batch_delay_s:
            self._one_at_a_time = getattr(self, "_one_at_a_time", None) or asyncio.Lock()  # of the actor's loop
            async with self._one_at_a_time:
                await asyncio.sleep(self.batch_delay_s)
        row_ids = batch.column(ROW_ID).to_pylist()
        tokens = column_or_none(batch, "tokenized_prompt")
        prompts = column_or_none(batch, "prompt")
        params = column_or_none(batch, "sampling_params")
        upstream_ok = ok_rows(batch)
        results = await asyncio.gather(
            *(
                self._answer(row_ids[i], tokens[i], prompts[i], params[i], started) if upstream_ok[i] else no_result()
                for i in range(batch.num_rows)
            )
        )
        batch = batch.drop_columns(
            [name for name in ("tokenized_prompt", "token_type_ids") if name in batch.column_names]
        )
        return with_results(batch, results, self._columns(), upstream_ok)

    def _columns(self) -> dict[str, pa.DataType]:
        if self.task_type == "generate":
            return generation_columns(self.tokenizer is not None)
        score = {"score": pa.float64()} if self.task_type == "score" else {}
        return {
            **score,
            "embeddings": pa.list_(pa.float32()),
            "num_input_tokens": pa.int32(),
            "time_taken_llm": pa.float64(),
        }

    async def _answer(
        self, row_id: Any, token_ids: Optional[list], prompt: Optional[str], params_json: Optional[str], started: float
    ) -> dict:
        ids = list(token_ids) if token_ids is not None else list((prompt or "").encode())
        seed = zlib.crc32(json.dumps(ids).encode())
        try:
            params = _checked(loads_params(params_json))
            if self.max_model_len is not None and len(ids) > self.max_model_len:
                raise ValueError(f"the prompt has {len(ids)} tokens, more than max_model_len {self.max_model_len}")
        except ValueError as exc:
            if not self.should_continue_on_error:
                raise RowError(row_id, "engine", f"FakeEngineError: {exc}") from None
            return {"error": f"FakeEngineError: {exc}"}
        if self.task_type != "generate":
            vector = [math.sin(seed + i) for i in range(VECTOR_SIZE)]
            return {
                "embeddings": vector,
                "num_input_tokens": len(ids),
                "time_taken_llm": time.perf_counter() - started,
                "score": 1 / (1 + math.exp(-vector[0])),
            }
        count = params.get("max_tokens", DEFAULT_MAX_TOKENS)
        span = max(self.vocab_size - FIRST_TOKEN_ID, 1)
        generated = [FIRST_TOKEN_ID + (seed + 7919 * position) % span for position in range(count)]
        return {
            "generated_tokens": generated,
            "num_input_tokens": len(ids),
            "num_generated_tokens": count,
            "time_taken_llm": time.perf_counter() - started,
            "finish_reason": "length",
            "request_id": f"{row_id}#{next(self.request_ids)}",
            "generated_text": self.tokenizer.decode(generated) if self.tokenizer is not None else None,
        }

    def shutdown(self) -> dict[str, Any]:
        return {}


def _checked(params: dict[str, Any]) -> dict[str, Any]:
    """The params vLLM would refuse, refused the same way (one row's error)."""
    if params.get("n", 1) != 1:
        raise ValueError(f"n is {params['n']!r}: one sequence per row")
    top_p = params.get("top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if params.get("temperature", 1.0) < 0:
        raise ValueError(f"temperature must be >= 0, got {params['temperature']}")
    return params


def _vocab_size(model_source: str) -> int:
    """Token ids the tokenizer decodes: the model's vocabulary, cut to the ids its tokenizer.json
    has (a model's vocabulary is often padded past its tokenizer's)."""
    folder = Path(str(model_source))
    config, tokenizer = folder / "config.json", folder / "tokenizer.json"
    size = int(json.loads(config.read_text()).get("vocab_size", 1024)) if config.exists() else 1024
    if tokenizer.exists():
        known = json.loads(tokenizer.read_text())
        ids = [
            *known.get("model", {}).get("vocab", {}).values(),
            *(token["id"] for token in known.get("added_tokens", [])),
        ]
        size = min(size, max(ids) + 1) if ids and all(isinstance(i, int) for i in ids) else size
    return size


def _tokenizer(model_source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_source))
