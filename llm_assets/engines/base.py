"""The engine seam: what an engine replica does, and how an engine plugs into a pipeline.

An engine replica is one engine (one vLLM engine, one SGLang engine, one HTTP client...) hosted in
a long-lived Ray actor by the engine pool (``engines/pool.py``). It implements ``EngineReplica``:

- built by ``__init__(**replica_kwargs)`` (the engine start: load the model, compile...);
- ``await process(batch)``: a ``pyarrow.Table`` in, the same rows (same order, same row ids) out
  with the engine's output columns added; a row the engine refuses raises ``RowError`` or, with
  ``should_continue_on_error``, comes back with ``__inference_error__`` set;
- ``fatal_errors()``: the exception types meaning the engine itself is gone (the pool then
  replaces the replica and resends its batches), never one row's problem;
- ``info()``: pid, host, start seconds, and ``max_num_seqs`` (how many requests it runs at once);
- ``shutdown()``, returning what the run's log should show about the engine (a dict, may be empty);
- optionally ``async ready()``, awaited after ``__init__`` by a replica whose engine runs elsewhere
  and may still be starting (a Ray Serve app).

An engine registers an ``EngineSpec`` under its processor config class in ``engines/__init__.py``
(one line), as ray.data.llm's ``ProcessorBuilder`` does. Nothing under ``engines/`` imports Dagster.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import pyarrow as pa


class EngineReplica(Protocol):
    def __init__(self, **replica_kwargs: Any) -> None: ...

    async def process(self, batch: pa.Table) -> pa.Table: ...

    def fatal_errors(self) -> tuple[type[BaseException], ...]: ...

    def info(self) -> dict[str, Any]: ...

    def shutdown(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EngineSpec:
    """How the pool starts an engine of one kind, and what it needs."""

    label: str  # in log lines and the UI's asset kinds: "vLLM"
    config_class: type
    # "module:Class" of the EngineReplica: imported only in the engine actor, so loading the
    # definitions never imports the engine library.
    replica: str
    # The engine library's distributions, first installed one wins; its version is part of the
    # engine stage's code version.
    distributions: tuple[str, ...]
    # Modules whose source changes the engine's output (hashed into the engine stage's code version).
    code_modules: tuple[str, ...]
    # (config, target: the resolved model_source or what ``target`` gives, on_gpu, engine_detokenizes) -> the replica's kwargs.
    replica_kwargs: Callable[..., dict[str, Any]]
    # (config, on_gpu) -> GPUs one replica needs.
    gpus_per_replica: Callable[[Any, bool], float]
    # on_gpu -> environment variables an engine actor needs (the user's runtime_env wins).
    actor_env: Callable[[bool], dict[str, str]] = lambda on_gpu: {}
    # on_gpu -> import what an engine start needs, while CPU stages run (best effort).
    preimport: Callable[[bool], Any] = lambda on_gpu: None
    # Settings of the config that change the engine's output (hashed into its code version).
    output_settings: Callable[[Any], dict[str, Any]] = field(default=lambda config: {})
    # config -> the longest prompt (tokens) the engine takes, when its settings say; Tokenize
    # then refuses longer prompts before any engine starts.
    max_prompt_tokens: Callable[[Any], Optional[int]] = field(default=lambda config: None)
    # config -> what the engine serves, for log lines and exports (a model, a URL).
    target: Callable[[Any], str] = field(default=lambda config: config.model_source)
    # config -> the model the run resolves before it starts (a local folder, a .gguf), or None
    # where the engine runs no model of its own (an HTTP endpoint).
    model_source: Callable[[Any], Optional[str]] = field(default=lambda config: config.model_source)
    # config -> a check of one row's decoded ``sampling_params`` that Preprocess runs (a picklable
    # callable raising ValueError naming the field), where the engine takes fewer than vLLM's.
    params_check: Callable[[Any], Optional[Callable[[dict], None]]] = field(default=lambda config: None)
    # config -> None, or a picklable check of a row's ``model`` value that Preprocess runs (raising
    # ValueError), for an engine that reads it: vLLM serves a LoRA adapter by that name.
    model_check: Callable[[Any], Optional[Callable[[Any], None]]] = field(default=lambda config: None)
    # Whether the engine takes each row's ``payload`` (a JSON object) instead of a chat or prompt:
    # Preprocess then checks for that.
    takes_payload: bool = False
    # config -> None, or a picklable check of one row that Preprocess runs instead of its chat /
    # prompt checks, for an engine taking requests of its own shape (a Serve deployment's
    # ``method`` and ``request_kwargs``): returns the row as stored, or raises ValueError.
    row_check: Callable[[Any], Optional[Callable[[dict], dict]]] = field(default=lambda config: None)
    # (config, target, on_gpu, engine_detokenizes, log) -> more replica kwargs (or None), run by
    # the pool in the run's process before its replicas start, for an engine whose model lives
    # outside the pool and may outlive the run (a Ray Serve app): deploy it, or find it and check
    # it is the one asked for.
    provision: Optional[Callable[..., Optional[dict[str, Any]]]] = None
    # (config, on_gpu) -> None, or the placement group each replica reserves (engines/placement.py):
    # an engine whose workers span several GPUs, or a user's placement_group_config.
    placement: Callable[[Any, bool], Any] = field(default=lambda config, on_gpu: None)

    def replica_class(self) -> type:
        module, name = self.replica.split(":")
        return getattr(importlib.import_module(module), name)

    def library_version(self) -> str:
        from importlib import metadata

        for name in self.distributions:
            try:
                return f"{name}=={metadata.version(name)}"
            except metadata.PackageNotFoundError:
                continue
        return "not installed"


# One token's log-probability: vLLM's Logprob with its token id (ray.data.llm keys a dict by the
# id; a Parquet map cannot hold that shape, a list of structs can).
LOGPROB = pa.struct([("token_id", pa.int32()), ("logprob", pa.float32()), ("rank", pa.int32()), ("decoded_token", pa.string())])


def generation_columns(engine_detokenizes: bool) -> dict[str, pa.DataType]:
    """The columns a generating engine adds (ray.data.llm's names), whatever the engine.
    ``logprobs`` (per generated token) and ``prompt_logprobs`` (per prompt token; the first is
    null) are null in rows whose sampling params do not ask for them."""
    columns = {"generated_tokens": pa.list_(pa.int32()), "num_input_tokens": pa.int32(), "num_generated_tokens": pa.int32(),
               "time_taken_llm": pa.float64(), "finish_reason": pa.string(), "request_id": pa.string(),
               "logprobs": pa.list_(pa.list_(LOGPROB)), "prompt_logprobs": pa.list_(pa.list_(LOGPROB))}
    if engine_detokenizes:
        columns["generated_text"] = pa.string()
    return columns


def replica_info(start_seconds: float, max_num_seqs: int) -> dict[str, Any]:
    """What ``EngineReplica.info()`` reports: where the replica runs (process, host, Ray node, the
    GPUs Ray gave it), how long it took to build, how many requests it runs at once."""
    import ray

    return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()], "start_seconds": round(start_seconds, 2), "max_num_seqs": max_num_seqs}


async def no_result() -> dict[str, Any]:
    """The result of a row an earlier stage failed: nothing is sent for it (``with_results`` keeps its error)."""
    return {}


def engine_kwarg_int(config: Any, name: str) -> Optional[int]:
    """An integer engine setting, when ``engine_kwargs`` set it (a context length, say)."""
    value = config.engine_kwargs.get(name)
    return int(value) if value else None


def with_results(batch: pa.Table, results: list[dict[str, Any]], columns: dict[str, pa.DataType],
                 upstream_ok: list[bool], keep_errors: bool) -> pa.Table:
    """A replica's per-row results (dicts) added to ``batch`` as ``columns``. Each row's ``error``
    goes to ``__inference_error__`` where errors are kept (``should_continue_on_error``) or an
    earlier stage set the column; a row an earlier stage failed keeps that stage's error."""
    from llm_assets.stages.base import ERROR_COLUMN, column_or_none, with_column

    for name, type_ in columns.items():
        batch = with_column(batch, name, [r.get(name) for r in results], type_)
    if keep_errors or ERROR_COLUMN in batch.column_names:
        upstream_errors = column_or_none(batch, ERROR_COLUMN)
        errors = [upstream_errors[i] if not upstream_ok[i] else r.get("error") for i, r in enumerate(results)]
        batch = with_column(batch, ERROR_COLUMN, errors, pa.string())
    return batch
