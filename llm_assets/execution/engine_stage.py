"""The engine stage as a Ray Data UDF: one engine replica per actor of a fixed actor pool.

``map_batches(EngineStage, compute=ActorPoolStrategy(size=concurrency), max_concurrency=
max_concurrent_batches, ...)``, as ray.data.llm runs its engine stage. The actor imports the
engine library and builds its replica when Ray Data creates it, at the start of the run, while
the CPU stages read and tokenize (``Engine.replica_class()``: the same classes for every engine).
It tells the run's ledger what it is doing (importing, building, ready, its batches, its
shutdown report), which the run's progress lines and stall reports show.

Rows that already have the engine's answer pass through untouched: a resumed attempt's kept
rows (``__kept__``) and rows the response cache answered (``__cached__``). A row the engine
refuses (``RowError``) fails its partition: that partition's rows leave the batch. An engine
that reports itself dead ends its process: Ray restarts the actor (``max_restarts``: the
resource's ``max_engine_restarts``) and Ray Data sends its batches again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any, AsyncIterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from llm_assets.engines.base import Engine
from llm_assets.execution.reads import KEPT, PARTITION
from llm_assets.model_store import model_on_this_node
from llm_assets.rows import ROW_ID, RowError

logger = logging.getLogger(__name__)
END_POLL_S = 0.5  # how often an engine asks whether the run's execution is over
CACHED = "__cached__"  # a row the response cache answered (execution/cache.py)
PASSED = (KEPT, CACHED)  # rows that already have the engine's answer


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def start_error(exc: BaseException) -> str:
    """Why an engine did not start, as its first lines: the engines' own checks (vLLM's pydantic
    configs) name the setting and what it takes on the lines after their first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {'; '.join(lines[:8])}"[:800]


def unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray error (a RowError raised in a worker, say)."""
    while True:
        cause = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(cause, BaseException) or cause is exc:
            return exc
        exc = cause


class EngineStartError(RuntimeError):
    pass


class EngineStage:
    def __init__(
        self,
        engine: Engine,
        replica_kwargs: dict[str, Any],
        on_gpu: bool,
        secret_env: dict[str, str],
        ledger,
        answer_columns: tuple[str, ...] = (),
    ):
        import ray

        os.environ.update(secret_env)  # this process is the engine's alone (see secret_env.py)
        self.ledger, self.answer_columns = ledger, answer_columns
        self.failed: set[str] = set()  # partitions failed so far (the ledger says, with each batch done)
        self.id = ray.get_runtime_context().get_actor_id()
        self._report({"state": "importing", "pid": os.getpid()})
        started = time.perf_counter()
        engine.preimport(on_gpu)
        import_seconds = time.perf_counter() - started
        self._report({"state": "building", "import_seconds": round(import_seconds, 2)})
        kwargs = dict(replica_kwargs)
        if "model_source" in kwargs:  # an S3 model: its files on this node first (model_store.py)
            kwargs["model_source"] = model_on_this_node(kwargs["model_source"])
        try:
            self.replica = engine.replica_class()(**kwargs)
            ready = getattr(self.replica, "ready", None)
            if ready is not None:  # a replica whose engine runs elsewhere waits for it here (a Serve app)
                asyncio.run(ready())
        except Exception as exc:
            self._report({"state": "failed", "error": start_error(exc)})
            raise
        self.fatal = (*self.replica.fatal_errors(), *_engine_dead_errors())
        self._report({"state": "ready", **self.replica.info(), "import_seconds": round(import_seconds, 2)})
        threading.Thread(target=self._shut_down_when_done, name="engine-end", daemon=True).start()

    def _shut_down_when_done(self) -> None:
        """Shut the engine down (its GPU memory freed, its core process ended) once the run says
        its execution is over, and report it: the run waits for that before it ends. Ray Data
        lets its actors go by dropping its handles; what runs in the actor then (this object's
        ``__del__``, ``atexit``) comes too late to be heard, or never."""
        import ray

        while True:
            time.sleep(END_POLL_S)
            try:
                if not ray.get(self.ledger.done.remote()):
                    continue
            except ray.exceptions.RayError:  # the run's ledger is gone: so is the run
                self.shutdown()
                return
            replica, self.replica = self.replica, None
            report = replica.shutdown() if replica is not None else {}
            self._report({"state": "shut down", "report": report or {}})
            return

    def _report(self, state: dict[str, Any]) -> None:
        import ray

        ray.get(self.ledger.engine.remote(self.id, {**state, "since": time.time()}))

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        if self.failed and batch.num_rows:  # rows of a partition failed meanwhile: no engine time for them
            batch = batch.filter(
                pc.invert(pc.is_in(batch.column(PARTITION), value_set=pa.array(list(self.failed), pa.string())))
            )
        passed = _mask(batch, PASSED)
        if passed is not None and pc.all(passed).as_py():
            yield batch
            return
        todo = batch if passed is None else batch.filter(pc.invert(passed))
        self.ledger.started.remote(self.id)  # what a lost engine had in flight, for its log line
        started = time.monotonic()
        output = await self._generate(todo)
        report = self.replica.report() if hasattr(self.replica, "report") else None
        self.failed = await self.ledger.batch.remote(self.id, output.num_rows, time.monotonic() - started, report)
        if passed is not None and pc.any(passed).as_py():
            kept = batch.filter(passed)
            # A partition the engine failed (its rows left the batch) loses its passed rows too.
            failed = set(pc.unique(todo.column(PARTITION)).to_pylist()) - set(
                pc.unique(output.column(PARTITION)).to_pylist()
            )
            if failed:
                kept = kept.filter(pc.invert(pc.is_in(kept.column(PARTITION), value_set=pa.array(list(failed)))))
            output = _in_order(batch, output, kept)
        yield output

    async def _generate(self, batch: pa.Table) -> pa.Table:
        """The replica's answers; a partition whose row the engine refuses leaves the batch."""
        while batch.num_rows:
            request = batch.drop_columns([c for c in (*PASSED, *self.answer_columns) if c in batch.column_names])
            try:
                return await self.replica.process(request)
            except RowError as exc:
                where = pc.index(batch.column(ROW_ID), str(exc.row_id)).as_py()
                if where < 0:
                    raise
                partition = batch.column(PARTITION)[where].as_py()
                await self.ledger.fail.remote(partition, exc)
                batch = batch.filter(pc.not_equal(batch.column(PARTITION), partition))
            except self.fatal as exc:
                # The engine is gone: end this process so that Ray restarts the actor (a new
                # engine) and Ray Data sends its batches again, as ray.data.llm does.
                await self.ledger.engine.remote(self.id, {"state": "dead", "error": first_line(exc)})
                os._exit(1)
        return batch

    def shutdown(self) -> None:
        """Shut the engine down (idempotent): when Ray Data lets the actor go (its graceful exit
        drops this object) or the process ends. Its report went to the ledger with each batch."""
        replica, self.replica = getattr(self, "replica", None), None
        if replica is not None:
            replica.shutdown()

    def __del__(self):
        self.shutdown()


def _engine_dead_errors() -> tuple[type[BaseException], ...]:
    """vLLM's ``EngineDeadError`` (by name: the engine library is the replica's business)."""
    import sys

    module = sys.modules.get("vllm.v1.engine.exceptions")
    dead = getattr(module, "EngineDeadError", None)
    return (dead,) if isinstance(dead, type) else ()


def _mask(batch: pa.Table, columns: tuple[str, ...]) -> Optional[pa.ChunkedArray]:
    present = [pc.fill_null(batch.column(c), False) for c in columns if c in batch.column_names]
    if not present:
        return None
    mask = present[0]
    for other in present[1:]:
        mask = pc.or_(mask, other)
    return mask


def _in_order(batch: pa.Table, answered: pa.Table, passed: pa.Table) -> pa.Table:
    """The engine's answers and the rows that passed, back in the batch's row order (columns the
    engine leaves out of its output, as the token ids, are left out of the passed rows too)."""
    passed = passed.drop_columns([c for c in passed.column_names if c not in answered.column_names and c not in PASSED])
    table = pa.concat_tables([answered, passed], promote_options="permissive")
    at = pc.index_in(batch.column(ROW_ID), value_set=table.column(ROW_ID))
    return table.take(at.filter(pc.is_valid(at)))
