"""The vLLM engine replica: token ids in, generated token ids out (or, for ``embed`` and
``classify``, the model's pooled vector in ``embeddings``), one engine per actor.

Every row of a batch becomes its own request, submitted at once, so the engine's scheduler sees
many requests in flight (across batches too: the actor runs several batches concurrently) and the
GPU never waits on one blocking ``generate`` per batch. A batch of pooling rows (embed, classify,
score) is handed to the engine's loop as one group and answered as one, its rows' ``time_taken_llm``
the batch's: they finish in one step, thousands a second, where a task per row cost the actor more
than the engine's own admission did (20 000 sentences on an H200: 0.81x raw vLLM's encode rate per
row, 1.12x per batch).

Usable as a Ray Data UDF on its own (``ds.map_batches(vLLMEngineStage, fn_constructor_kwargs=...,
compute=ActorPoolStrategy(size=N), batch_format="pyarrow")``); inside llm_assets the run's engine
stage (``execution/engine_stage.py``) hosts it in a Ray Data actor and calls :meth:`process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from typing import Any, AsyncIterator, Optional

import pyarrow as pa

from llm_assets.engines.base import generation_columns, no_result, replica_info, with_results
from llm_assets.engines.compile_cache import CompileCacheWatch, use_compile_cache
from llm_assets.engines.vllm import compat as vllm_compat
from llm_assets.engines.vllm.lora import LoraAdapters
from llm_assets.engines.vllm.metrics import EngineMetrics, stat_loggers
from llm_assets.engines.vllm.multimodal import multi_modal_data
from llm_assets.rows import ROW_ID, RowError, column_or_none, loads_params, ok_rows
from llm_assets.stages.media import COLUMN as MEDIA

logger = logging.getLogger(__name__)
STAGE = "engine"
PROMPT_SNIPPET_CHARS = 200


class vLLMEngineStage:
    def __init__(
        self,
        model_source: str,
        engine_kwargs: Optional[dict[str, Any]] = None,
        task_type: str = "generate",
        max_pending_requests: Optional[int] = None,
        should_continue_on_error: bool = False,
        engine_detokenizes: bool = True,
        base_model: Optional[str] = None,
        dynamic_lora_loading_path: Optional[str] = None,
        lora_s3_access: Any = None,
        log_engine_metrics: bool = False,
    ):
        started = time.perf_counter()
        self.task_type = task_type
        self.should_continue_on_error = should_continue_on_error
        # When a Detokenize stage follows, the engine skips detokenizing (less CPU in the engine
        # process); rows with stop strings still need it, vLLM matches stops on text.
        self.engine_detokenizes = engine_detokenizes
        self.metrics = EngineMetrics() if log_engine_metrics else None
        loggers = stat_loggers(self.metrics) if self.metrics is not None else None
        use_compile_cache()
        compile_cache = CompileCacheWatch()
        self.engine = vllm_compat.start_engine(loggers, model=model_source, **(engine_kwargs or {}))
        self.compile_cache = compile_cache.outcome(eager=vllm_compat.compiles_nothing(self.engine))
        self.max_num_seqs = vllm_compat.max_num_seqs(self.engine)
        # With max_pending_requests set, every row waits for its own turn (so pooling rows skip the group path).
        self.pending_limit = asyncio.Semaphore(max_pending_requests) if max_pending_requests else None
        self.request_ids = itertools.count()
        self._fatal = vllm_compat.fatal_engine_errors()
        # Rows mostly share their sampling params: one SamplingParams per distinct JSON (vLLM
        # clones it per request, as for the one object LLM.generate passes for every prompt).
        # Parsing and building it for every row took the actor's time from the engine's loop.
        self.pools = task_type in vllm_compat.POOLING_TASKS  # a vector per row (embed, classify), no generation
        self._params = functools.lru_cache(maxsize=1024)(self._build_pooling if self.pools else self._build_sampling)
        # A row's ``model`` other than the config's model_source (or this folder) is a LoRA adapter (lora.py).
        base_models = tuple(str(name) for name in (base_model, model_source) if name)
        self.adapters = LoraAdapters(
            base_models, dynamic_lora_loading_path, lora_s3_access, self.engine.add_lora, logger.info
        )
        self.start_seconds = time.perf_counter() - started

    def fatal_errors(self) -> tuple[type[BaseException], ...]:
        return self._fatal

    def info(self) -> dict[str, Any]:
        graphs = vllm_compat.cuda_graph_max_tokens(self.engine)
        return {
            **replica_info(self.start_seconds, self.max_num_seqs),
            **self.compile_cache,
            "cuda_graph_max_tokens": graphs,
        }

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        yield await self.process(batch)

    async def process(self, batch: pa.Table) -> pa.Table:
        row_ids = batch.column(ROW_ID).to_pylist()
        token_ids = column_or_none(batch, "tokenized_prompt")
        prompts = column_or_none(batch, "prompt")
        params = column_or_none(batch, "pooling_params" if self.pools else "sampling_params")
        token_types = column_or_none(batch, "token_type_ids")  # a scored pair's segments
        models = column_or_none(batch, "model")  # a LoRA adapter's name, or the base model
        media_items = column_or_none(batch, MEDIA)  # PrepareMultimodal's stored media
        upstream_ok = ok_rows(batch)
        if "tokenized_prompt" not in batch.column_names and any(column_or_none(batch, "tokenization_kwargs")):
            row = next(i for i, kwargs in enumerate(column_or_none(batch, "tokenization_kwargs")) if kwargs)
            raise RowError(
                row_ids[row],
                STAGE,
                "has tokenization_kwargs, which the Tokenize stage applies, and this pipeline runs "
                "without it (tokenize_stage=False): enable it or drop them",
            )
        rows = (row_ids, token_ids, prompts, params, token_types, models)
        if self.pools and not any(media_items) and self.pending_limit is None:
            results = await self._pool_all(rows, upstream_ok)
        else:
            results = await asyncio.gather(
                *(
                    self._generate(*(column[i] for column in rows), media_items[i]) if upstream_ok[i] else no_result()
                    for i in range(batch.num_rows)
                )
            )
        # The ids (and a pair's segments, the media) are persisted by earlier stages; not copying them keeps this
        # output small.
        batch = batch.drop_columns(
            [name for name in ("tokenized_prompt", "token_type_ids", MEDIA) if name in batch.column_names]
        )
        return with_results(batch, results, self._columns(), upstream_ok)

    def _columns(self) -> dict[str, pa.DataType]:
        if self.pools:
            score = {"score": pa.float64()} if self.task_type == "score" else {}
            return {
                **score,
                "embeddings": pa.list_(pa.float32()),
                "num_input_tokens": pa.int32(),
                "time_taken_llm": pa.float64(),
            }
        return generation_columns(self.engine_detokenizes)

    async def _request(
        self,
        row_id: Any,
        token_ids: Any,
        prompt: Optional[str],
        params_json: Optional[str],
        token_type_ids: Optional[list],
        model: Optional[str],
    ) -> tuple[str, dict, Any, Any]:
        """The row as one engine request: (request id, prompt, params, LoRA request)."""
        lora_request = await self.adapters.request_for(model)
        params = self._params(params_json)
        if token_type_ids is not None:
            params = vllm_compat.with_token_types(params, token_type_ids)
        if token_ids is not None:
            request = vllm_compat.tokens_prompt(token_ids)
        elif prompt:
            request = vllm_compat.text_prompt(prompt)
        else:
            raise ValueError("the row has neither 'tokenized_prompt' nor a non-empty 'prompt'")
        return f"{row_id}#{next(self.request_ids)}", request, params, lora_request

    def _row_failed(self, row_id: Any, prompt: Optional[str], exc: Exception) -> dict:
        """A row's own failure: the run's error, or with should_continue_on_error the row's."""
        if self.engine.errored:
            raise exc  # a dead engine is never one row's problem
        if not self.should_continue_on_error:
            raise RowError(row_id, STAGE, f"{type(exc).__name__}: {exc}") from exc
        return {"error": f"{type(exc).__name__}: {exc} (prompt: {(prompt or '')[:PROMPT_SNIPPET_CHARS]!r})"}

    async def _pool_all(self, rows: tuple[list, ...], upstream_ok: list[bool]) -> list[dict]:
        """Pooling rows (one vector each, no media), handed to the engine as one group."""
        row_ids, _, prompts, *_ = rows
        results: list[dict] = [{} for _ in upstream_ok]
        requests, positions = [], []
        for i, ok in enumerate(upstream_ok):
            if not ok:
                continue
            try:
                requests.append(await self._request(*(column[i] for column in rows)))
                positions.append(i)
            except Exception as exc:
                results[i] = self._row_failed(row_ids[i], prompts[i], exc)
        started = time.perf_counter()
        outputs = await self.engine.generate_all(requests)
        taken = time.perf_counter() - started  # the group's: its rows are answered together
        for i, output in zip(positions, outputs):
            if isinstance(output, self._fatal):
                raise output
            results[i] = (
                self._row_failed(row_ids[i], prompts[i], output)
                if isinstance(output, Exception)
                else self._pooled(output, taken)
            )
        return results

    def _pooled(self, final: Any, taken: float) -> dict:
        vector = final.outputs.data.tolist()
        return {
            "embeddings": vector,
            "num_input_tokens": len(final.prompt_token_ids or []),
            "time_taken_llm": taken,
            "score": vector[0] if len(vector) == 1 else None,
        }

    async def _generate(
        self,
        row_id: Any,
        token_ids: Any,
        prompt: Optional[str],
        params_json: Optional[str],
        token_type_ids: Optional[list] = None,
        model: Optional[str] = None,
        media_items: Optional[list] = None,
    ) -> dict:
        started = time.perf_counter()
        try:
            request_id, request, params, lora_request = await self._request(
                row_id, token_ids, prompt, params_json, token_type_ids, model
            )
            if media_items:  # decoded off the event loop: other rows' requests keep flowing
                request["multi_modal_data"] = await asyncio.to_thread(
                    multi_modal_data, media_items, self.engine.vllm_config.model_config
                )
            async with self.pending_limit or contextlib.nullcontext():
                final = await self.engine.generate(request, params, request_id=request_id, lora_request=lora_request)
        except self._fatal:
            raise
        except Exception as exc:
            return self._row_failed(row_id, prompt, exc)
        if self.pools:
            return self._pooled(final, time.perf_counter() - started)
        completion = final.outputs[0]
        return {
            "generated_tokens": list(completion.token_ids),
            "num_input_tokens": len(final.prompt_token_ids or []),
            "num_generated_tokens": len(completion.token_ids),
            "time_taken_llm": time.perf_counter() - started,
            "finish_reason": completion.finish_reason,
            "generated_text": completion.text if self.engine_detokenizes else None,
            "request_id": request_id,
            "logprobs": _logprobs(completion.logprobs),
            "prompt_logprobs": _logprobs(final.prompt_logprobs),
        }

    def _build_sampling(self, params_json: Optional[str]):
        params = loads_params(params_json)
        if not self.engine_detokenizes and not params.get("stop"):
            params.setdefault("detokenize", False)
        return vllm_compat.sampling_params(**params)

    def _build_pooling(self, params_json: Optional[str]):
        return vllm_compat.pooling_params(self.task_type, **loads_params(params_json))

    def report(self) -> dict[str, float]:
        """Where the engine's loop spent its time so far, and its metrics with log_engine_metrics."""
        report = self.engine.report()
        return report if self.metrics is None else {**report, **self.metrics.summary()}

    def shutdown(self) -> dict[str, float]:
        self.engine.shutdown()
        return self.report()


def _logprobs(positions: Any) -> Optional[list]:
    """vLLM's per-position ``{token_id: Logprob}`` dicts (None where a position has none, as the
    first prompt token) as lists of LOGPROB structs; None when the row asked for none."""
    if positions is None:
        return None
    return [
        [
            {"token_id": token_id, "logprob": entry.logprob, "rank": entry.rank, "decoded_token": entry.decoded_token}
            for token_id, entry in position.items()
        ]
        if position is not None
        else None
        for position in positions
    ]
