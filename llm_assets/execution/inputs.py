"""Where each partition enters a run, and the units (batches) it feeds in.

A partition enters the run's chain of stages at its first stage that is not up to date: a stage
whose committed output has the stage's current code version and was computed from the current
input (the upstream's committed attempt, or the same source file) is kept, unless the run asks to
recompute. Units then come from the source file (read in order: row ids follow the file) or from
the committed files of the stage before the entry. An engine stage that a killed run left half
done is resumed: the complete files of its attempt are kept, only the rows they lack are sent to
the engine, and the kept rows still flow on to the stages after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm_assets.execution.stats import PartitionStats, batch_counts
from llm_assets.rows import ROW_ID
from llm_assets.tasks import ENGINE


@dataclass
class Unit:
    """A batch of one partition on its way through the chain."""

    partition: str
    seq: int  # its place in the partition: names its files, orders them in the manifest
    rows: int
    ref: Any  # the table, in Ray's object store
    entry: int  # chain index of the first stage it is computed for (earlier ones are committed)
    after_engine: bool = False  # it already has the engine's output (a resumed attempt's file)
    # Set by the response cache's lookup (execution/cache.py) for a unit it sends to the engine:
    # its rows answered from the cache (a table ref) and the unit's row order, to put back after.
    looked_up: bool = False
    hits: Any = None
    order: Optional[list] = None


@dataclass
class Entry:
    """How one partition takes part in a run."""

    partition: str
    index: Optional[int]  # chain index of the first stage to compute; None: all are up to date
    kept: dict[str, PartitionStats] = field(default_factory=dict)
    rows: int = 0  # the partition's rows, once its input is read
    resumed: Optional[tuple[str, list[str], list[int]]] = None  # engine attempt adopted: (attempt, files, rows)
    resumed_stats: dict[str, int] = field(default_factory=dict)
    input: str = ""  # what the entry stage computes from: the upstream's committed attempt, or the file's fingerprint
    upstream: Any = None  # the manifest of the stage before the entry (None when the entry reads the source)


def input_identity(pipeline, stage: str, partition: str, storage) -> str:
    upstream = pipeline.plan(stage).upstream
    if upstream is None:
        return pipeline.source.fingerprint(partition)
    manifest = storage.manifest(pipeline.name, upstream, partition)
    return manifest.attempt if manifest is not None else ""


def plan_entry(
    pipeline, chain: list[str], partition: str, storage, versions: dict[str, str], recompute: bool, log
) -> Entry:
    """Where the partition enters the chain. Each manifest is read once (on S3 each read is a
    request, and a run plans every partition before its engines start)."""
    entry = Entry(partition, None)
    first_upstream = pipeline.plan(chain[0]).upstream
    entry.upstream = storage.manifest(pipeline.name, first_upstream, partition) if first_upstream else None
    for index, stage in enumerate(chain):
        manifest = None if recompute else storage.manifest(pipeline.name, stage, partition)
        if first_upstream or index:
            entry.input = entry.upstream.attempt if entry.upstream is not None else ""
        else:
            try:
                entry.input = pipeline.source.fingerprint(partition)
            except (OSError, ValueError):  # the source file is gone or unreadable: recompute, and fail there clearly
                entry.input = ""
        if (
            manifest is None
            or manifest.stats.get("code_version") != versions[stage]
            or not entry.input
            or manifest.stats.get("input") != entry.input
        ):
            entry.index = index
            break
        entry.kept[stage] = PartitionStats.from_manifest(manifest.stats)
        log(f"{stage} [{partition}]: up to date (code version {versions[stage]}, same input); not recomputed")
        entry.upstream = manifest
    if entry.index is not None and chain[entry.index] == ENGINE:
        info = {"code_version": versions[ENGINE], "input": entry.input}
        entry.resumed = storage.resumable_attempt(pipeline.name, ENGINE, partition, info)
    return entry


def _read_part(path: str, filesystem, exclude: Optional[pa.Array] = None) -> pa.Table:
    table = pq.read_table(path, filesystem=filesystem)
    if exclude is not None and len(exclude):
        table = table.filter(pc.invert(pc.is_in(table.column(ROW_ID), value_set=exclude)))
    return table


def units(pipeline, chain: list[str], entry: Entry, storage, chunk_rows: int, copies: Optional[str]) -> Iterator[Unit]:
    """The partition's units, lazily, in order (``copies``: where the run keeps its S3 input objects)."""
    import ray

    stage = chain[entry.index]
    seq = 0
    upstream = pipeline.plan(stage).upstream
    if upstream is None:  # from the source file, read here in order
        for chunk in pipeline.source.read(entry.partition, chunk_rows=chunk_rows, copies=copies):
            entry.rows += chunk.num_rows
            yield Unit(entry.partition, seq, chunk.num_rows, ray.put(chunk), entry.index)
            seq += 1
        return
    # The manifest planning read; without one this raises, saying what to materialize first.
    manifest, files = storage.committed(pipeline.name, upstream, entry.partition, manifest=entry.upstream)
    entry.rows = manifest.rows
    filesystem = storage.filesystem()
    done = pa.array([], pa.string())
    if entry.resumed is not None:
        done, seq = yield from _resumed_units(pipeline, chain, entry, storage)
    file_rows = manifest.file_rows or [pq.ParquetFile(path, filesystem=filesystem).metadata.num_rows for path in files]
    read = ray.remote(num_cpus=0.25)(_read_part)
    for path, rows in zip(files, file_rows):
        if len(done):  # a resumed partition: only the rows the kept files lack (read here, rare)
            table = _read_part(path, filesystem, done)
            if table.num_rows:
                yield Unit(entry.partition, seq, table.num_rows, ray.put(table), entry.index)
                seq += 1
            continue
        yield Unit(entry.partition, seq, rows, read.remote(path, filesystem), entry.index)
        seq += 1


def _resumed_units(pipeline, chain: list[str], entry: Entry, storage):
    """Feed the adopted engine files on to the stages after the engine; returns their row ids."""
    import ray

    attempt, names, file_rows = entry.resumed
    filesystem = storage.filesystem()
    base = storage.partition_dir(pipeline.name, ENGINE, entry.partition)
    ids, seq = [], 0
    counts: dict[str, Any] = {"rows": 0, "input_tokens": 0, "generated_tokens": 0, "errors": 0, "extra": {}}
    continues = chain.index(ENGINE) + 1 < len(chain)
    for name in names:
        table = pq.read_table(f"{base}/{name}", filesystem=filesystem)
        ids.append(table.column(ROW_ID))
        found = batch_counts(table, pipeline.engine.count_columns)
        for key in ("rows", "input_tokens", "generated_tokens", "errors"):
            counts[key] += found[key]
        for counted, value in found.get("extra", {}).items():
            counts["extra"][counted] = counts["extra"].get(counted, 0) + value
        if continues:
            yield Unit(entry.partition, seq, table.num_rows, ray.put(table), chain.index(ENGINE) + 1, after_engine=True)
        seq += 1
    entry.resumed_stats = counts
    return (pa.chunked_array(ids, pa.string()).combine_chunks() if ids else pa.array([], pa.string())), seq
