"""The engine seam: what an engine replica does, and how an engine plugs into a pipeline.

An engine is a subclass of :class:`Engine`, registered under its processor config class with
:func:`register_engine` (one line in ``engines/__init__.py``), as ray.data.llm registers a builder
per config class. It says what a pipeline needs to know of it (the model it runs, its GPUs and
placement, the settings that change its output, its row checks, its extra count columns) and how
its replicas are built; every method has a default but ``replica_kwargs``. Nothing outside its own
package names an engine.

An engine replica is one engine (one vLLM engine, one SGLang engine, one HTTP client...) hosted in
an actor of the run's Ray Data engine pool (``execution/engine_stage.py``). It implements ``EngineReplica``:

- built by ``__init__(**replica_kwargs)`` (the engine start: load the model, compile...);
- ``await process(batch)``: a ``pyarrow.Table`` in, the same rows (same order, same row ids) out
  with the engine's output columns added; a row the engine refuses raises ``RowError`` or, with
  ``should_continue_on_error``, comes back with ``__inference_error__`` set;
- ``fatal_errors()``: the exception types meaning the engine itself is gone (Ray then restarts
  the actor and Ray Data resends its batches), never one row's problem;
- ``info()``: pid, host, start seconds, and ``max_num_seqs`` (how many requests it runs at once);
- ``shutdown()``, returning what the run's log should show about the engine (a dict, may be empty);
- optionally ``report()``: that dict so far, sent with every batch (the run logs the last one when
  its engines have ended: an actor's own last words may come too late to be heard);
- optionally ``async ready()``, awaited after ``__init__`` by a replica whose engine runs elsewhere
  and may still be starting (a Ray Serve app).

Nothing under ``engines/`` imports Dagster.
"""

from __future__ import annotations

import abc
import importlib
import os
import socket
from typing import Any, Callable, ClassVar, Optional, Protocol

import pyarrow as pa


class EngineReplica(Protocol):
    def __init__(self, **replica_kwargs: Any) -> None: ...

    async def process(self, batch: pa.Table) -> pa.Table: ...

    def fatal_errors(self) -> tuple[type[BaseException], ...]: ...

    def info(self) -> dict[str, Any]: ...

    def shutdown(self) -> dict[str, Any]: ...


RowCheck = Callable[[dict[str, Any]], dict[str, Any]]


class Engine(abc.ABC):
    """One kind of engine, for one processor config. Subclasses set the class attributes and
    override what differs from the defaults."""

    label: ClassVar[str]  # in log lines and the UI's asset kinds: "vLLM"
    config_class: ClassVar[type]
    # "module:Class" of the EngineReplica: imported only in the engine actor, so loading the
    # definitions never imports the engine library.
    replica: ClassVar[str]
    # The engine library's distributions, first installed one wins; its version is part of the
    # engine stage's code version.
    distributions: ClassVar[tuple[str, ...]] = ()
    # Modules whose source changes the engine's output (hashed into the engine stage's code version).
    code_modules: ClassVar[tuple[str, ...]] = ()
    # Output columns of counts the engine adds (column -> the name its sum has in the stage's
    # metadata): the HTTP engine's retries, say.
    count_columns: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Any):
        self.config = config

    # --- what the engine runs, and where ------------------------------------------------------
    def model_source(self) -> Optional[str]:
        """The model the run resolves before it starts (a local folder, a .gguf), or None where
        the engine runs no model of its own (an HTTP endpoint)."""
        return self.config.model_source

    def target(self) -> str:
        """What the engine serves, for log lines and exports (a model, a URL)."""
        return self.config.model_source

    def gpus_per_replica(self, on_gpu: bool) -> float:
        return 0.0

    def placement(self, on_gpu: bool) -> Any:
        """None, or the placement group each replica reserves (``engines/placement.py``): an
        engine whose workers span several GPUs, or a user's placement_group_config."""
        return None

    def actor_env(self, on_gpu: bool) -> dict[str, str]:
        """Environment variables an engine actor needs (the user's runtime_env wins)."""
        return {}

    def sequences_at_once(self, on_gpu: bool) -> Optional[int]:
        """How many rows one replica runs at once, as its config says before it starts (vLLM's
        max_num_seqs); None where the engine does not say (an HTTP endpoint, a Serve app): then
        max_concurrent_batches alone sizes the rows it is handed at once."""
        return None

    def preimport(self, on_gpu: bool) -> None:
        """Import what an engine start needs, in the engine actor while CPU stages run."""

    @abc.abstractmethod
    def replica_kwargs(self, target: str, on_gpu: bool, engine_detokenizes: bool) -> dict[str, Any]:
        """The replica's constructor kwargs (``target``: the resolved model_source, or ``target()``)."""

    def provision(
        self, target: str, on_gpu: bool, engine_detokenizes: bool, log: Callable[[str], None]
    ) -> dict[str, Any]:
        """Run in the run's process before its replicas start, for an engine whose model lives
        outside the pool and may outlive the run (a Ray Serve app): deploy it, or find it and check
        it is the one asked for. Returns more replica kwargs."""
        return {}

    # --- what changes its output ----------------------------------------------------------------
    def output_settings(self) -> dict[str, Any]:
        """Settings of the config that change the engine's output (hashed into its code version)."""
        return {}

    def library_version(self) -> str:
        from importlib import metadata

        for name in self.distributions:
            try:
                return f"{name}=={metadata.version(name)}"
            except metadata.PackageNotFoundError:
                continue
        return "not installed"

    def max_prompt_tokens(self) -> Optional[int]:
        """The longest prompt (tokens) the engine takes, when its settings say; Tokenize then
        refuses longer prompts before any engine starts."""
        return None

    # --- rows ---------------------------------------------------------------------------------------
    def check_row(self, row: dict[str, Any], task_check: RowCheck) -> dict[str, Any]:
        """Preprocess's check of one row, after the user's function: the task's check, then the
        engine's. An engine taking requests of its own shape (an HTTP payload) checks them instead.
        Raises ValueError naming the field; returns the row as stored."""
        return task_check(row)

    def check_sampling_params(self, params: dict[str, Any]) -> None:
        """A row's decoded ``sampling_params``, where the engine takes fewer than vLLM's: raise
        ValueError naming the field."""

    def check_model(self, model: Any) -> None:
        """A row's ``model`` value, for an engine that reads it (vLLM serves a LoRA adapter by
        that name): raise ValueError."""

    def replica_class(self) -> type:
        module, name = self.replica.split(":")
        return getattr(importlib.import_module(module), name)


# Processor config class -> its engine class.
ENGINES: dict[type, type[Engine]] = {}


def register_engine(engine: type[Engine]) -> type[Engine]:
    """Register an engine under its processor config class (usable as a class decorator)."""
    ENGINES[engine.config_class] = engine
    return engine


def engine_for(config: Any) -> Engine:
    try:
        return ENGINES[type(config)](config)
    except KeyError:
        known = ", ".join(cls.__name__ for cls in ENGINES)
        raise TypeError(f"no engine is registered for {type(config).__name__}: expected one of {known}") from None


# One token's log-probability: vLLM's Logprob with its token id (ray.data.llm keys a dict by the
# id; a Parquet map cannot hold that shape, a list of structs can).
LOGPROB = pa.struct(
    [("token_id", pa.int32()), ("logprob", pa.float32()), ("rank", pa.int32()), ("decoded_token", pa.string())]
)


def generation_columns(engine_detokenizes: bool) -> dict[str, pa.DataType]:
    """The columns a generating engine adds (ray.data.llm's names), whatever the engine.
    ``logprobs`` (per generated token) and ``prompt_logprobs`` (per prompt token; the first is
    null) are null in rows whose sampling params do not ask for them."""
    columns = {
        "generated_tokens": pa.list_(pa.int32()),
        "num_input_tokens": pa.int32(),
        "num_generated_tokens": pa.int32(),
        "time_taken_llm": pa.float64(),
        "finish_reason": pa.string(),
        "request_id": pa.string(),
        "logprobs": pa.list_(pa.list_(LOGPROB)),
        "prompt_logprobs": pa.list_(pa.list_(LOGPROB)),
    }
    if engine_detokenizes:
        columns["generated_text"] = pa.string()
    return columns


def replica_info(start_seconds: float, max_num_seqs: int) -> dict[str, Any]:
    """What ``EngineReplica.info()`` reports: where the replica runs (process, host, Ray node, the
    GPUs Ray gave it), how long it took to build, how many requests it runs at once."""
    import ray

    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
        "start_seconds": round(start_seconds, 2),
        "max_num_seqs": max_num_seqs,
    }


async def no_result() -> dict[str, Any]:
    """The result of a row an earlier stage failed: nothing is sent for it (``with_results`` keeps its error)."""
    return {}


def engine_kwarg_int(config: Any, name: str) -> Optional[int]:
    """An integer engine setting, when ``engine_kwargs`` set it (a context length, say)."""
    value = config.engine_kwargs.get(name)
    return int(value) if value else None


def with_results(
    batch: pa.Table,
    results: list[dict[str, Any]],
    columns: dict[str, pa.DataType],
    upstream_ok: list[bool],
) -> pa.Table:
    """A replica's per-row results (dicts) added to ``batch`` as ``columns``, and each row's
    ``error`` as ``__inference_error__`` ('' for a good row, as ray.data.llm 2.60's engine stages
    write it whatever ``should_continue_on_error`` says: a postprocess may read it); a row an
    earlier stage failed keeps that stage's error."""
    from llm_assets.rows import ERROR_COLUMN, column_or_none, with_column

    for name, type_ in columns.items():
        batch = with_column(batch, name, [r.get(name) for r in results], type_)
    upstream_errors = column_or_none(batch, ERROR_COLUMN)
    errors = [upstream_errors[i] if not upstream_ok[i] else (r.get("error") or "") for i, r in enumerate(results)]
    batch = with_column(batch, ERROR_COLUMN, errors, pa.string())
    return batch
