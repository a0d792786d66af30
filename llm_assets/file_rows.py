"""One input file's rows: Parquet, CSV, JSON Lines (OpenAI Batch request files too) and text,
read in chunks, each row with a stable ``row_id``; errors name the file, and for JSON Lines the
line. Used by the sources (sources.py) for a file partition and for each file of a folder one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from llm_assets import openai_batch
from llm_assets.errors import SourceError
from llm_assets.rows import ROW_ID, table_of

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


# UTF-8, a byte order mark at the file's start skipped (editors and exports on Windows write one;
# pyarrow's CSV and JSON readers, and so Ray Data's, skip it too).
TEXT_ENCODING = "utf-8-sig"


def read_rows(
    path: Path,
    display: str,
    partition_key: str,
    chunk_rows: int,
    seen: Optional[set] = None,
    may_be_empty: bool = False,
) -> Iterator[pa.Table]:
    """A file's rows in chunks, each with a ``row_id`` column; errors name ``display``. ``seen``:
    row ids of the partition's files before this one (ids must be unique across them);
    ``may_be_empty``: a file of a folder partition (its folder needs rows, not each file)."""
    seen = set() if seen is None else seen
    offset = 0
    for chunk in _read_chunks(path, display, chunk_rows, partition_key):
        if chunk.num_rows == 0:
            continue
        if ROW_ID in chunk.column_names:
            ids = chunk.column(ROW_ID).to_pylist()
            for index, row_id in enumerate(ids):
                if row_id is None or row_id in seen:
                    problem = "is empty" if row_id is None else f"repeats {row_id!r}"
                    raise SourceError(
                        f"{display}: row {offset + index} (counted from 0): column {ROW_ID!r} {problem}; "
                        "row ids must be unique"
                    )
                seen.add(row_id)
            chunk = chunk.set_column(chunk.schema.get_field_index(ROW_ID), ROW_ID, pa.array([str(i) for i in ids]))
        else:
            ids = [f"{partition_key}:{offset + i}" for i in range(chunk.num_rows)]
            chunk = chunk.append_column(ROW_ID, pa.array(ids, pa.string()))
        offset += chunk.num_rows
        yield chunk
    if offset == 0 and not may_be_empty:
        raise SourceError(f"{display} has no rows: an input file needs at least one row")


def _read_chunks(path: Path, display: str, chunk_rows: int, partition_key: str) -> Iterator[pa.Table]:
    kind = FORMATS[path.suffix.lower()]
    if kind == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except pa.ArrowInvalid as exc:
            raise SourceError(f"{display}: not a readable Parquet file: {exc}") from exc
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            yield pa.Table.from_batches([batch])
    elif kind == "csv":
        try:
            with pacsv.open_csv(str(path)) as reader:
                for batch in reader:
                    yield pa.Table.from_batches([batch])
        except pa.ArrowInvalid as exc:
            raise SourceError(f"{display}: not a readable CSV file: {exc}") from exc
    elif kind == "text":
        yield from _read_text(path, display, chunk_rows)
    else:
        yield from _read_jsonl(path, display, chunk_rows, partition_key)


def _read_text(path: Path, display: str, chunk_rows: int) -> Iterator[pa.Table]:
    lines: list[str] = []
    try:
        with open(path, encoding=TEXT_ENCODING) as text:
            for line in text:
                if line.strip():
                    lines.append(line.rstrip("\r\n"))
                if len(lines) == chunk_rows:
                    yield pa.table({"text": lines})
                    lines = []
    except UnicodeDecodeError as exc:
        raise SourceError(f"{display}: not UTF-8 text: {exc}") from exc
    if lines:
        yield pa.table({"text": lines})


def _read_jsonl(path: Path, display: str, chunk_rows: int, partition_key: str) -> Iterator[pa.Table]:
    """JSON Lines parsed line by line, so a bad line is reported with its number (1-based, as
    editors show it) and the row id it has (``{file}:{index}``, counted from 0, blank lines
    skipped). A file whose first object is an OpenAI Batch API request is read as one throughout,
    and every bad line of it is named in one error, lines that are not JSON among them."""
    if openai_batch.is_openai_batch_line(_first_object(path)):
        # Its row ids are the custom_ids; its messages name lines alone.
        lines = _jsonl_objects(path, display, "", keep_going=True)
        partition_key = ""
        numbered = enumerate(openai_batch.rows_from_openai_batch(lines, display), start=1)
    else:
        numbered = _jsonl_objects(path, display, partition_key)
    chunk: list[tuple[int, dict]] = []
    offset = 0
    for line_number, row in numbered:
        chunk.append((line_number, row))
        if len(chunk) >= chunk_rows:
            yield _table(chunk, display, partition_key, offset)
            offset += len(chunk)
            chunk = []
    if chunk:
        yield _table(chunk, display, partition_key, offset)


def _first_object(path: Path) -> Any:
    """The first line that parses as JSON (None if none does): says what kind of file this is."""
    with open(path, encoding=TEXT_ENCODING) as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
    return None


def _line(display: str, line_number: int, partition_key: str, index: int, row: Optional[dict] = None) -> str:
    if not partition_key:
        return f"{display}: line {line_number}"
    row_id = row.get(ROW_ID) if row and row.get(ROW_ID) is not None else f"{partition_key}:{index}"
    return f"{display}: line {line_number} (row {str(row_id)!r})"


def _table(numbered_rows: list[tuple[int, dict]], display: str, partition_key: str, offset: int) -> pa.Table:
    """The rows as a table; a field whose values are of different kinds is named with its line."""
    rows = [row for _, row in numbered_rows]
    try:
        return table_of(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        kinds: dict[str, str] = {}
        for index, (line_number, row) in enumerate(numbered_rows, start=offset):
            for name, value in row.items():
                if value is None:
                    continue
                kind = _json_kind(value)
                expected = kinds.setdefault(name, kind)
                if kind != expected:
                    raise SourceError(
                        f"{_line(display, line_number, partition_key, index, row)}: field {name!r} is {kind} "
                        f"({value!r:.40}): expected {expected}, as on the lines before it"
                    ) from None
        raise SourceError(f"{display}: rows that cannot form one table: {exc}") from None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _jsonl_objects(path: Path, display: str, partition_key: str, keep_going: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) per non-blank line. A bad line raises, or with ``keep_going``
    comes as (line number, ``openai_batch.BadLine``) for the reader to collect."""
    index = 0  # the row's position: what its row id counts
    with open(path, encoding=TEXT_ENCODING) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problem = f"invalid JSON: {exc.msg} (column {exc.colno})"
                if keep_going:
                    yield line_number, openai_batch.BadLine(problem)
                    continue
                raise SourceError(f"{_line(display, line_number, partition_key, index)}: {problem}") from None
            if not isinstance(row, dict) and not keep_going:
                raise SourceError(
                    f"{_line(display, line_number, partition_key, index)}: expected a JSON object, "
                    f"got {type(row).__name__}"
                )
            yield line_number, row
            index += 1
