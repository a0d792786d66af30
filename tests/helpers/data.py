"""Input files, committed outputs and attempts, as tests write and read them."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def questions(n: int, prefix: str = "q") -> list[dict]:
    return [{"question": f"{prefix} number {i}: say something about the number {i}"} for i in range(n)]


def committed_rows(storage, pipeline: str, stage: str, partition: str, order_by: str = "row_id") -> list[dict]:
    """A stage's committed rows of one partition, as dicts ordered by ``order_by``."""
    return sorted(
        (row for table in storage.read_committed(pipeline, stage, partition) for row in table.to_pylist()),
        key=lambda row: row[order_by],
    )


def write_attempt(
    storage, pipeline: str, stage: str, partition: str, tables: list, commit: bool = True, info=None
) -> str:
    """Write ``tables`` as one attempt's part files (as a run's tasks do); commit it unless told not to."""
    from llm_assets.atomic import write_parquet
    from llm_assets.storage import new_attempt_name

    attempt = new_attempt_name()
    storage.create_attempt(pipeline, stage, partition, attempt, info)
    base = storage.partition_dir(pipeline, stage, partition)
    names = [f"{attempt}/part-{i:05d}-test.parquet" for i in range(len(tables))]
    for name, table in zip(names, tables):
        write_parquet(storage.filesystem(), f"{base}/{name}", table)
    if commit:
        storage.commit(
            pipeline,
            stage,
            partition,
            attempt,
            names,
            [t.num_rows for t in tables],
            {"rows_out": sum(t.num_rows for t in tables)},
        )
    return attempt
