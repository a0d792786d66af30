"""Input sources: a landing folder whose files become partitions (one dynamic partition per file).

Rows are read in streaming chunks and get a stable ``row_id``: the file's own ``row_id`` column
when it has one (it must be unique), else ``"{partition}:{index}"``, the row's position in the file.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from llm_assets.stages.base import ROW_ID, table_of

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


class SourceError(ValueError):
    pass


@dataclass(frozen=True)
class LocalFolderSource:
    """Files matching ``pattern`` in ``folder``; the partition key is the file's name."""

    folder: str
    pattern: str = "*.jsonl"

    def files(self) -> dict[str, Path]:
        folder = Path(self.folder).expanduser()
        if not folder.is_dir():
            return {}
        return {
            path.name: path
            for path in sorted(folder.iterdir())
            if path.is_file() and fnmatch.fnmatch(path.name, self.pattern) and path.suffix.lower() in FORMATS
        }

    def partition_keys(self) -> list[str]:
        return list(self.files())

    def path_for(self, partition_key: str) -> Path:
        path = self.files().get(partition_key)
        if path is None:
            raise SourceError(f"no input file {partition_key!r} in {self.folder} (pattern {self.pattern!r})")
        return path

    def read(self, partition_key: str, chunk_rows: int = 1024) -> Iterator[pa.Table]:
        """The file's rows in chunks, each with a ``row_id`` column."""
        path = self.path_for(partition_key)
        seen: set = set()
        offset = 0
        for chunk in _read_chunks(path, chunk_rows):
            if chunk.num_rows == 0:
                continue
            if ROW_ID in chunk.column_names:
                ids = chunk.column(ROW_ID).to_pylist()
                for index, row_id in enumerate(ids):
                    if row_id is None or row_id in seen:
                        problem = "is empty" if row_id is None else f"repeats {row_id!r}"
                        raise SourceError(f"{path}: row {offset + index}: column {ROW_ID!r} {problem}; row ids must be unique")
                    seen.add(row_id)
                chunk = chunk.set_column(chunk.schema.get_field_index(ROW_ID), ROW_ID, pa.array([str(i) for i in ids]))
            else:
                ids = [f"{partition_key}:{offset + i}" for i in range(chunk.num_rows)]
                chunk = chunk.append_column(ROW_ID, pa.array(ids, pa.string()))
            offset += chunk.num_rows
            yield chunk
        if offset == 0:
            raise SourceError(f"{path} has no rows: an input file needs at least one row")


def _read_chunks(path: Path, chunk_rows: int) -> Iterator[pa.Table]:
    kind = FORMATS[path.suffix.lower()]
    if kind == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except pa.ArrowInvalid as exc:
            raise SourceError(f"{path}: not a readable Parquet file: {exc}") from exc
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            yield pa.Table.from_batches([batch])
    elif kind == "csv":
        with pacsv.open_csv(str(path)) as reader:
            for batch in reader:
                yield pa.Table.from_batches([batch])
    else:
        yield from _read_jsonl(path, chunk_rows)


def _read_jsonl(path: Path, chunk_rows: int) -> Iterator[pa.Table]:
    """JSON Lines parsed line by line, so a bad line is reported with its number."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}: line {line_number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}: line {line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            if len(rows) >= chunk_rows:
                yield table_of(rows)
                rows = []
    if rows:
        yield table_of(rows)
