"""The SGLang engine replica: token ids in, generated token ids out, one ``sglang.Engine`` per actor.

Every row of a batch becomes its own ``async_generate`` request, submitted at once, so SGLang's
scheduler sees many requests in flight (across batches too: the actor runs several batches
concurrently). The engine's scheduler and detokenizer run in processes of their own; its
tokenizer manager runs on this actor's event loop, the one ``process`` is awaited on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from typing import Any, Optional

import pyarrow as pa

from llm_assets.engines.base import generation_columns, no_result, replica_info, with_results
from llm_assets.engines.compile_cache import use_compile_cache
from llm_assets.engines.sglang.params import to_sglang
from llm_assets.rows import ROW_ID, RowError, column_or_none, loads_params, ok_rows

STAGE = "engine"
# How many requests SGLang runs at once when engine_kwargs set no max_running_requests (its
# scheduler sizes that from the KV cache; this only sizes how many rows the pool keeps in flight).
DEFAULT_RUNNING_REQUESTS = 1024


class SGLangEngineReplica:
    def __init__(
        self,
        model_source: str,
        engine_kwargs: dict[str, Any],
        should_continue_on_error: bool = False,
        engine_detokenizes: bool = False,
        max_pending_requests: Optional[int] = None,
    ):
        import sglang

        started = time.perf_counter()
        self.should_continue_on_error, self.engine_detokenizes = should_continue_on_error, engine_detokenizes
        use_compile_cache()  # SGLang's Triton kernels and torch.compile graphs (with enable_torch_compile)
        self.engine = sglang.Engine(model_path=model_source, **engine_kwargs)
        self.max_num_seqs = int(engine_kwargs.get("max_running_requests") or DEFAULT_RUNNING_REQUESTS)
        self.request_ids = itertools.count()
        self.semaphore = asyncio.Semaphore(max_pending_requests) if max_pending_requests else contextlib.nullcontext()
        # Rows mostly share their params: translate each distinct JSON once.
        self._params = functools.lru_cache(maxsize=1024)(lambda text: to_sglang(loads_params(text)))
        self.start_seconds = time.perf_counter() - started

    def fatal_errors(self) -> tuple[type[BaseException], ...]:
        # SGLang's processes dying ends this actor (its watchdog kills the process tree): the pool
        # sees the actor die. An error raised to one request is that request's.
        return ()

    def info(self) -> dict[str, Any]:
        return replica_info(self.start_seconds, self.max_num_seqs)

    async def process(self, batch: pa.Table) -> pa.Table:
        row_ids = batch.column(ROW_ID).to_pylist()
        token_ids, prompts = column_or_none(batch, "tokenized_prompt"), column_or_none(batch, "prompt")
        params = column_or_none(batch, "sampling_params")
        upstream_ok = ok_rows(batch)
        results = await asyncio.gather(
            *(
                self._generate(row_ids[i], token_ids[i], prompts[i], params[i]) if upstream_ok[i] else no_result()
                for i in range(batch.num_rows)
            )
        )
        if "tokenized_prompt" in batch.column_names:
            batch = batch.drop_columns(["tokenized_prompt"])  # persisted by Tokenize already
        return with_results(batch, results, generation_columns(self.engine_detokenizes), upstream_ok)

    async def _generate(self, row_id: Any, token_ids: Any, prompt: Optional[str], params_json: Optional[str]) -> dict:
        started = time.perf_counter()
        try:
            request = {"sampling_params": self._params(params_json), "rid": f"{row_id}#{next(self.request_ids)}"}
            if token_ids is not None:
                request["input_ids"] = list(token_ids)
            elif prompt:
                request["prompt"] = prompt
            else:
                raise ValueError("the row has neither 'tokenized_prompt' nor a non-empty 'prompt'")
            async with self.semaphore:
                output = await self.engine.async_generate(**request)
            finish = _finish_reason(output["meta_info"].get("finish_reason"))
        except Exception as exc:
            if not self.should_continue_on_error:
                raise RowError(row_id, STAGE, f"{type(exc).__name__}: {exc}") from exc
            return {"error": f"{type(exc).__name__}: {exc} (prompt: {(prompt or '')[:200]!r})"}
        meta = output["meta_info"]
        return {
            "generated_tokens": list(output.get("output_ids") or []),
            "num_input_tokens": meta.get("prompt_tokens"),
            "num_generated_tokens": meta.get("completion_tokens"),
            "time_taken_llm": time.perf_counter() - started,
            "finish_reason": finish,
            "generated_text": output.get("text"),
            "request_id": request["rid"],
        }

    def shutdown(self) -> dict[str, Any]:
        self.engine.shutdown()
        return {}


def _finish_reason(reason: Any) -> str:
    """SGLang's ``{"type": "length" | "stop" | "abort", ...}`` as vLLM's ``length``/``stop``; an
    aborted request is an error."""
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind in ("length", "stop"):
        return kind
    message = reason.get("message") if isinstance(reason, dict) else None
    raise RuntimeError(f"SGLang ended the request: {message or reason}")
