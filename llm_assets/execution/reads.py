"""The run's inputs as a Ray Data datasource: one read task per file, each row tagged with its partition.

A partition enters the run's chain at its first stage that is not up to date (``plan.py``): from
its source file (read by the source's own reader, so JSONL errors keep their line numbers and rows
their ``{file}:{index}`` ids), or from the committed Parquet files of the stage before (their
manifest's files). A resumed engine attempt's complete files come in after the engine, marked
``__kept__``: they are the engine's output already, and are neither sent to the engine nor written
again. A file that cannot be read now (a source file changed since the check before the run) fails
its partition in the ledger and yields nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pyarrow as pa

from llm_assets.errors import SourceError

PARTITION = "__partition__"
KEPT = "__kept__"  # a row of a resumed engine attempt's complete file
# A row's place in its partition (its input file's order): stage files are named by their first
# row's, so that a partition's files, and what is read back from them, keep the input's order
# whatever the row ids (an OpenAI Batch file's custom_ids, say).
POSITION = "__position__"
# Read tasks reserve no logical CPU: Ray Data starts every actor pool of the run at once and keeps
# it to the end, and a read that waited for one of those CPUs would wait forever (two engines and
# four operators of half a CPU fill a local Ray of 4). Their number is capped below instead.
READ_CPUS = 0
SOURCE_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class ReadItem:
    """One file of one partition: its source file (``source`` set), or a committed Parquet file."""

    partition: str
    rows: Optional[int] = None  # as far as known before reading (the manifest's count)
    source: Any = None  # the pipeline's source: read its partition's file
    path: Optional[str] = None  # a committed Parquet file
    filesystem: Any = None
    exclude: tuple = field(default=())  # row ids to leave out (rows a resumed attempt has already)
    kept: bool = False  # rows of a resumed engine attempt, past the engine
    copies: Optional[str] = None  # where the run keeps its S3 input objects (downloaded once)
    start: int = 0  # the position of the item's first row in its partition


def _read(item: ReadItem, ledger) -> Iterator[pa.Table]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from llm_assets.rows import ROW_ID

    try:
        if item.source is not None:
            tables = item.source.read(item.partition, chunk_rows=SOURCE_CHUNK_ROWS, copies=item.copies)
        else:
            tables = pq.ParquetFile(item.path, filesystem=item.filesystem).iter_batches()
        position = item.start
        for table in tables:
            table = table if isinstance(table, pa.Table) else pa.Table.from_batches([table])
            table = table.append_column(POSITION, pa.array(range(position, position + table.num_rows), pa.int64()))
            position += table.num_rows
            if item.exclude:
                table = table.filter(pc.invert(pc.is_in(table.column(ROW_ID), value_set=pa.array(item.exclude))))
            if table.num_rows:
                table = table.append_column(PARTITION, pa.array([item.partition] * table.num_rows, pa.string()))
                if item.kept:
                    table = table.append_column(KEPT, pa.array([True] * table.num_rows, pa.bool_()))
                yield table
    except SourceError as exc:  # changed since the check before the run: its partition fails, not the run
        ray.get(ledger.fail.remote(item.partition, exc))


def file_position(name: str) -> int:
    """The position of a stage file's first row, from its name (``part-{position:010d}-...``)."""
    head = name.rsplit("/", 1)[-1].split("-")
    return int(head[1]) if len(head) > 2 and head[1].isdigit() else 0


def read_dataset(items: list[ReadItem], ledger, cluster_cpus: float):
    """A Ray Data dataset of the items' rows."""
    import ray

    # One block stream per file: Ray Data would otherwise split a small file's rows into up to 200
    # blocks. Read tasks at once: capped here (they reserve no CPU, see READ_CPUS), since each runs
    # in a worker process of its own that Ray's pool then keeps, idle, for the rest of the run
    # (eight of 0.2-0.3 GiB at the memory peak on a 16-core GPU machine, when four could run per
    # CPU); a file reads in well under the time its rows take in the stages after it.
    return ray.data.read_datasource(
        _Reads(items, ledger),
        num_cpus=READ_CPUS,
        override_num_blocks=len(items),
        # (no more than the files: Ray Data warns of a limit it cannot reach)
        concurrency=max(1, min(len(items), max(2, int(cluster_cpus) // 4))),
    )


class _Reads:
    """A Ray Data ``Datasource`` (made one in ``__new__``: Ray Data is imported only where a run runs)."""

    def __new__(cls, items: list[ReadItem], ledger):
        from ray.data import Datasource, ReadTask

        class Reads(Datasource):
            def estimate_inmemory_data_size(self) -> Optional[int]:
                return None

            def get_read_tasks(self, parallelism: int, **_: Any) -> list:
                return [ReadTask(lambda item=item: _read(item, ledger), _metadata(item)) for item in items]

        return Reads()


def _metadata(item: ReadItem):
    """Ray Data's block metadata for a read task (its fields differ between Ray releases)."""
    from ray.data.block import BlockMetadata

    known = {
        "num_rows": item.rows,
        "size_bytes": None,
        "input_files": [item.path] if item.path else None,
        "exec_stats": None,
        "schema": None,
    }
    return BlockMetadata(**{f.name: known[f.name] for f in dataclasses.fields(BlockMetadata) if f.name in known})
