"""Where each partition enters a run, and the files its rows come from.

A partition enters the run's chain of stages at its first stage that is not up to date: a stage
whose committed output has the stage's current code version and was computed from the current
input (the upstream's committed attempt, or the same source file) is kept, unless the run asks to
recompute. Its rows then come from the source file or from the committed files of the stage
before the entry (``execution/reads.py`` reads them in Ray Data). An engine stage that a killed
run left half done is resumed: the complete files of its attempt are kept, only the rows they
lack are sent to the engine, and the kept rows still flow on to the stages after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow.parquet as pq

from llm_assets.execution.reads import ReadItem, file_position
from llm_assets.execution.stats import PartitionStats, batch_counts
from llm_assets.rows import ROW_ID
from llm_assets.tasks import ENGINE


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


def read_items(pipeline, chain: list[str], entry: Entry, storage, copies: Optional[str]) -> list[ReadItem]:
    """The files the partition's rows come from, entering at its entry stage: its source file, or
    the committed files of the stage before. A resumed engine attempt's complete files enter
    with the engine's input, marked kept (the engine passes them by), and the upstream rows they
    hold are left out; their counts go into the engine stage's stats."""
    stage = chain[entry.index]
    upstream = pipeline.plan(stage).upstream
    if upstream is None:
        return [ReadItem(entry.partition, rows=entry.rows or None, source=pipeline.source, copies=copies)]
    # The manifest planning read; without one this raises, saying what to materialize first.
    manifest, files = storage.committed(pipeline.name, upstream, entry.partition, manifest=entry.upstream)
    entry.rows = manifest.rows
    filesystem = storage.filesystem()
    kept: list[ReadItem] = []
    exclude: tuple = ()
    if entry.resumed is not None:
        attempt, names, _ = entry.resumed
        base = storage.partition_dir(pipeline.name, ENGINE, entry.partition)
        ids = []
        counts: dict[str, Any] = {"rows": 0, "input_tokens": 0, "generated_tokens": 0, "errors": 0, "extra": {}}
        for name in names:
            table = pq.read_table(f"{base}/{name}", filesystem=filesystem)
            ids.extend(table.column(ROW_ID).to_pylist())
            found = batch_counts(table, pipeline.engine.count_columns)
            for key in ("rows", "input_tokens", "generated_tokens", "errors"):
                counts[key] += found[key]
            for counted, value in found.get("extra", {}).items():
                counts["extra"][counted] = counts["extra"].get(counted, 0) + value
            kept.append(
                ReadItem(
                    entry.partition,
                    rows=table.num_rows,
                    path=f"{base}/{name}",
                    filesystem=filesystem,
                    kept=True,
                    start=file_position(name),
                )
            )
        entry.resumed_stats = counts
        exclude = tuple(ids)
    file_rows = manifest.file_rows or [None] * len(files)
    upstream_items = [
        ReadItem(
            entry.partition,
            rows=None if exclude else rows,
            path=path,
            filesystem=filesystem,
            exclude=exclude,
            start=file_position(path),
        )
        for path, rows in zip(files, file_rows)
    ]
    # In the input's order (Ray Data reads them at once, so this is the order they most likely arrive in).
    return sorted(upstream_items + kept, key=lambda item: item.start)


def chains(pipeline, selected: list[str]) -> list[list[str]]:
    """The selected stages as runs of consecutive stages, in pipeline order."""
    names = pipeline.stage_names()
    runs: list[list[str]] = []
    for name in names:
        if name not in selected:
            continue
        if runs and names.index(runs[-1][-1]) == names.index(name) - 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs
