"""The Ray Data UDF of a group of consecutive CPU stages: each stage's UDF applied to the batch, and
each stage's output of each partition in the batch written as one Parquet file into the stage's
attempt folder of that partition, from this worker (the rows never travel back to the run's
process). What was written goes to the run's ledger before the batch goes on.

The stages never see the run's own columns (the partition a row belongs to, marks of the engine
resume and of the response cache): they are set aside and put back, as every stage maps rows one
to one. A row a stage refuses (``RowError``) fails its partition in the ledger: the partition's
rows leave the batch and the stage runs again on the others. The group that ends the chain hands
on nothing: the rows never travel to the run's process.

The first group after the engine writes the engine's output as it comes (a spec with no UDF): the
engine actors spend no time on Parquet; the engine's new answers go into the response cache.
Rows of a resumed attempt's kept files are not written again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from llm_assets.atomic import write_parquet
from llm_assets.execution.cache import KEY, NOT_IN_ENGINE_OUTPUT, CacheSettings, store_answers
from llm_assets.execution.engine_stage import CACHED
from llm_assets.execution.reads import KEPT, PARTITION, POSITION
from llm_assets.execution.stats import batch_counts, batch_summary
from llm_assets.rows import ERROR_COLUMN, ROW_ID, RowError
from llm_assets.secret_env import applied as secret_env_applied
from llm_assets.storage import create_attempt_folder

# The run's own columns, never written and never shown to a stage.
RUN_COLUMNS = (PARTITION, POSITION, KEPT, KEY, CACHED)


@dataclass(frozen=True)
class StageSpec:
    name: str
    udf: Optional[type]  # None: the engine's output, written as it comes
    kwargs: dict[str, Any] = field(default_factory=dict)
    count_columns: dict[str, str] = field(default_factory=dict)  # the engine's own counts (Engine.count_columns)
    write: bool = True  # False: a step that is no stage of its own (the response cache's lookup)


@dataclass(frozen=True)
class Targets:
    """Where each stage's output of each partition goes: its attempt folder (a full path)."""

    filesystem: Any
    folders: dict[tuple[str, str], str]
    infos: dict[str, dict] = field(default_factory=dict)  # folder -> what it records (a new engine attempt)


class CpuStages:
    """``map_batches(CpuStages, fn_constructor_kwargs=..., compute=ActorPoolStrategy(...))``: a
    worker builds its stages once (a tokenizer loaded once) and keeps them for the run."""

    def __init__(
        self,
        stages: list[StageSpec],
        targets: Targets,
        ledger,
        secret_env: dict[str, str],
        last: bool,
        cache: Optional[CacheSettings] = None,
    ):
        size_tokenizer_threads()
        self.targets, self.ledger, self.secret_env, self.last, self.cache = targets, ledger, secret_env, last, cache
        self.failed: set[str] = set()  # partitions failed so far (the ledger says, with each batch's records)
        self.created: set[str] = set()  # attempt folders this worker made sure exist
        with secret_env_applied(secret_env):
            self.stages = [(spec, spec.udf(**spec.kwargs) if spec.udf is not None else None) for spec in stages]

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        records: list[dict[str, Any]] = []
        batch = _without_partitions(batch, self.failed)
        with secret_env_applied(self.secret_env):
            for spec, udf in self.stages:
                if udf is None:
                    if spec.kwargs.get("cache_only"):  # before anything is stored or handed on
                        batch = self._defer_misses(batch)
                    # Rows the cache answered passed the engine by: '' for them, as an engine writes for a good row.
                    batch = _no_error_as_empty(batch)
                    records.extend(self._write_engine_output(spec, batch))
                    batch = batch.drop_columns([c for c in (KEY, CACHED) if c in batch.column_names])
                else:
                    batch = self._apply(spec, udf, batch)
                    if spec.write:
                        records.extend(self._write(spec, batch))
        self.failed = ray.get(self.ledger.wrote.remote(records))
        # The chain's last group hands nothing on: its files are the output (the ledger counts them).
        return batch.select([PARTITION]).slice(0, 0) if self.last else batch

    def _apply(self, spec: StageSpec, udf, batch: pa.Table) -> pa.Table:
        """The stage on the batch's rows; a partition whose row the stage refuses leaves the batch."""
        import ray

        while batch.num_rows:
            own = batch.drop_columns([name for name in RUN_COLUMNS if name in batch.column_names])
            try:
                out = udf(own)
            except RowError as exc:
                partition = _partition_of(batch, exc.row_id)
                if partition is None:
                    raise
                ray.get(self.ledger.fail.remote(partition, exc))
                batch = batch.filter(pc.not_equal(batch.column(PARTITION), partition))
                continue
            if out.num_rows != batch.num_rows:
                raise RuntimeError(
                    f"stage {spec.name} returned {out.num_rows} rows for {batch.num_rows}: stages map rows one to one"
                )
            for name in RUN_COLUMNS:
                if name in batch.column_names:
                    out = out.append_column(name, batch.column(name))
            return out
        return batch

    def _write_engine_output(self, spec: StageSpec, batch: pa.Table) -> list[dict[str, Any]]:
        """The engine's new answers into the response cache; its output written, but for the rows
        of a resumed attempt's kept files (written already). Rows answered from the cache are
        counted apart: their tokens are not this run's generated tokens."""
        if self.cache is not None and KEY in batch.column_names:
            store_answers(_without(batch, CACHED), self.cache, self.targets.filesystem)
        # What the engines leave out of their output (earlier stages keep it): rows that passed
        # them by leave it out too.
        batch = batch.drop_columns([c for c in NOT_IN_ENGINE_OUTPUT if c in batch.column_names])
        records = self._write(spec, _without(batch, KEPT))
        if CACHED in batch.column_names:
            for record in records:
                cached = batch.filter(
                    pc.and_(_flag(batch, CACHED), pc.equal(batch.column(PARTITION), record["partition"]))
                )
                record["cached"] = cached.num_rows
                record["cached_tokens"] = batch_counts(cached)["generated_tokens"]
        return records

    def _defer_misses(self, batch: pa.Table) -> pa.Table:
        """In a run without engines: the partitions of rows the cache did not answer leave the
        batch (their unanswered rows are neither stored as answers nor handed to the stages after
        the engine), and the run takes them again with engines (rows of a resumed attempt count as
        answered)."""
        import ray

        answered = (
            pc.or_(_flag(batch, CACHED), _flag(batch, KEPT)) if KEPT in batch.column_names else _flag(batch, CACHED)
        )
        missed = pc.unique(batch.filter(pc.invert(answered)).column(PARTITION)).to_pylist()
        if not missed:
            return batch
        ray.get(self.ledger.defer.remote(missed))
        return _without_partitions(batch, missed)

    def _write(self, spec: StageSpec, batch: pa.Table) -> list[dict[str, Any]]:
        """The stage's output of each partition in the batch, one file each; their records."""
        records = []
        partitions = batch.column(PARTITION)
        for partition in pc.unique(partitions).to_pylist():
            rows = batch.filter(pc.equal(partitions, partition))
            position = 0
            if POSITION in rows.column_names:  # a batch may join blocks out of order (a resumed attempt's)
                rows = rows.sort_by(POSITION)
                position = rows.column(POSITION)[0].as_py()
            rows = rows.drop_columns([name for name in RUN_COLUMNS if name in rows.column_names])
            # Named by its rows: a retried task writes the same rows under the same name.
            digest = hashlib.sha256("\n".join(map(str, rows.column(ROW_ID).to_pylist())).encode()).hexdigest()[:24]
            folder = self.targets.folders[(spec.name, partition)]
            if folder not in self.created:
                create_attempt_folder(self.targets.filesystem, folder, self.targets.infos.get(folder))
                self.created.add(folder)
            first = rows.column(ROW_ID)[0].as_py()
            # Named by its first row's place in the input: a partition's files sort in its order.
            name = f"part-{position:010d}-{digest}.parquet"
            write_parquet(self.targets.filesystem, f"{folder}/{name}", rows)
            records.append(
                {
                    "stage": spec.name,
                    "partition": partition,
                    "file": f"{folder.rsplit('/', 1)[1]}/{name}",
                    "first": first,
                    "position": position,
                    **batch_counts(rows, spec.count_columns),
                    **batch_summary(rows),
                }
            )
        return records


def _flag(batch: pa.Table, name: str) -> pa.ChunkedArray:
    return pc.fill_null(batch.column(name), False)


def _no_error_as_empty(batch: pa.Table) -> pa.Table:
    """``__inference_error__`` '' where a row has none (rows the cache answered passed the engine by)."""
    if ERROR_COLUMN not in batch.column_names:
        return batch.append_column(ERROR_COLUMN, pa.array([""] * batch.num_rows, pa.string()))
    index = batch.schema.get_field_index(ERROR_COLUMN)
    return batch.set_column(index, ERROR_COLUMN, pc.fill_null(batch.column(index).cast(pa.string()), ""))


def _without(batch: pa.Table, flag: str) -> pa.Table:
    """The batch's rows not marked ``flag``."""
    return batch.filter(pc.invert(_flag(batch, flag))) if flag in batch.column_names else batch


def _without_partitions(batch: pa.Table, partitions) -> pa.Table:
    if not partitions or not batch.num_rows:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch.column(PARTITION), value_set=pa.array(list(partitions), pa.string()))))


def _partition_of(batch: pa.Table, row_id: Any) -> Optional[str]:
    found = pc.index(batch.column(ROW_ID), str(row_id)).as_py()
    return batch.column(PARTITION)[found].as_py() if found >= 0 else None


def size_tokenizer_threads() -> None:
    """Hugging Face tokenizers encode and decode batches on a Rayon pool of one thread per core of
    the machine, whatever CPUs the worker reserved: a few stage workers beside the engine then run
    dozens of threads that compete with the engine's step loop for cores. As Ray sizes OpenMP
    (``OMP_NUM_THREADS``: the worker's CPUs), so is the pool sized, unless the stage's runtime_env
    sets ``RAYON_NUM_THREADS``. Rayon reads it once, when a process first tokenizes."""
    os.environ.setdefault("RAYON_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
