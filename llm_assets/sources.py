"""Input sources: a landing location whose files become partitions (one dynamic partition per file).

Two kinds: a local folder, and an S3 prefix read through dagster-aws's ``S3Resource`` (with
``endpoint_url`` for S3-compatible stores). The partition key is the file's path relative to the
folder or prefix, so it is stable: the same file is one partition however often it is seen.

Formats by extension: Parquet, CSV, JSON Lines, text (``.txt``: one row per non-empty line, in a
``text`` column, as Ray Data's ``read_text``); a JSONL file whose lines are OpenAI Batch API
requests (``custom_id``, ``method``, ``url``, ``body``) is mapped to rows with ``custom_id`` as the
row id. Rows are read in streaming chunks and get a stable ``row_id``: the file's own ``row_id``
column when it has one (it must be unique), else ``"{partition}:{index}"``, the row's position.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from llm_assets import openai_batch
from llm_assets.errors import SourceError  # also importable from here, as before
from llm_assets.rows import ROW_ID, table_of
from llm_assets.s3 import S3Access

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass(frozen=True)
class LocalFolderSource:
    """Files matching ``pattern`` in ``folder``; the partition key is the file's name."""

    folder: str
    pattern: str = "*.jsonl"

    @property
    def location(self) -> str:
        return str(Path(self.folder).expanduser())

    def missing(self) -> Optional[str]:
        """Why no file can be found here, if the folder itself is missing (a typo, or not created yet)."""
        folder = Path(self.folder).expanduser()
        return None if folder.is_dir() else f"the landing folder {folder} does not exist"

    def files(self) -> dict[str, Path]:
        folder = Path(self.folder).expanduser()
        if not folder.is_dir():
            return {}
        return {
            path.name: path for path in sorted(folder.iterdir()) if path.is_file() and _wanted(path.name, self.pattern)
        }

    def partition_keys(self) -> list[str]:
        return list(self.files())

    def path_for(self, partition_key: str) -> Path:
        # The key is the file's name: one lookup, not a listing of the folder (a run plans every
        # partition, and listing per partition made planning 1 000 partitions take 20 s).
        path = Path(self.folder).expanduser() / partition_key
        if Path(partition_key).name != partition_key or not _wanted(partition_key, self.pattern) or not path.is_file():
            raise SourceError(f"no input file {partition_key!r} in {self.folder} (pattern {self.pattern!r})")
        return path

    def fingerprint(self, partition_key: str) -> str:
        """Changes when the file does (size and modification time)."""
        return _stat_fingerprint(self.path_for(partition_key).stat())

    def fingerprints(self) -> dict[str, str]:
        """Partition key -> fingerprint of every file, from one listing and a stat per file (no reads)."""
        return {key: _stat_fingerprint(path.stat()) for key, path in self.files().items()}

    def read(self, partition_key: str, chunk_rows: int = 1024, copies: Optional[str] = None) -> Iterator[pa.Table]:
        """The file's rows in chunks, each with a ``row_id`` column (``copies``: unused, the file is local)."""
        path = self.path_for(partition_key)
        yield from read_rows(path, str(path), partition_key, chunk_rows)


@dataclass(frozen=True)
class S3PrefixSource:
    """Objects under ``s3://bucket/prefix`` matching ``pattern``; the partition key is the object's
    key relative to the prefix. ``s3`` (a dagster-aws ``S3Resource``) gives the endpoint, region
    and credentials; without it boto3's defaults apply."""

    bucket: str
    prefix: str = ""
    pattern: str = "*.jsonl"
    s3: Optional[Any] = field(default=None, compare=False)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self._prefix()}"

    def missing(self) -> Optional[str]:
        """None: a missing bucket or a refused listing fails the listing itself, naming the bucket."""
        return None

    def _prefix(self) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/" if prefix else ""

    def __reduce__(self):
        # Ray ships the source to the read tasks of a run: a dagster-aws resource does not unpickle
        # there (its config schema), its settings do.
        s3 = self.s3 if self.s3 is None or isinstance(self.s3, S3Access) else S3Access.of(self.s3)
        return (type(self), (self.bucket, self.prefix, self.pattern, s3))

    def _client(self):
        if isinstance(self.s3, S3Access):
            return self.s3.client()
        if self.s3 is not None:
            return self.s3.get_client()
        import boto3

        # A session of its own: boto3's default session is not safe to share between the
        # threads that plan a run's partitions.
        return boto3.session.Session().client("s3")

    def objects(self) -> dict[str, dict[str, Any]]:
        """Partition key -> the object's listing entry (Key, ETag, Size, ...)."""
        prefix = self._prefix()
        found: dict[str, dict[str, Any]] = {}
        pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for entry in page.get("Contents", []):
                key = entry["Key"][len(prefix) :]
                if key and not key.endswith("/") and _wanted(key.rsplit("/", 1)[-1], self.pattern):
                    found[key] = entry
        return dict(sorted(found.items()))

    def partition_keys(self) -> list[str]:
        return list(self.objects())

    def fingerprint(self, partition_key: str) -> str:
        """The object's ETag, from one HEAD request (not a listing of the whole prefix)."""
        try:
            head = self._client().head_object(Bucket=self.bucket, Key=f"{self._prefix()}{partition_key}")
        except Exception as exc:  # botocore's ClientError for a missing object
            raise SourceError(f"no input object {partition_key!r} under {self.location}: {exc}") from None
        return _etag(head)

    def fingerprints(self) -> dict[str, str]:
        """Partition key -> ETag of every object, from one listing (which returns the ETags)."""
        return {key: _etag(entry) for key, entry in self.objects().items()}

    def read(self, partition_key: str, chunk_rows: int = 1024, copies: Optional[str] = None) -> Iterator[pa.Table]:
        """Downloads the object to a local file (Parquet needs random access), then reads it in
        chunks like a local file; errors name the s3:// URI. With ``copies`` (a folder the caller
        keeps, e.g. for one run) the download is kept there and read again from there."""
        key = f"{self._prefix()}{partition_key}"
        display = f"s3://{self.bucket}/{key}"
        if copies is not None:
            local = Path(copies) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}{Path(partition_key).suffix}"
            if not local.exists():
                self._download(key, local)
            yield from read_rows(local, display, partition_key, chunk_rows)
            return
        with tempfile.TemporaryDirectory(prefix="llm-assets-s3-") as tmp:
            local = Path(tmp) / f"object{Path(partition_key).suffix}"
            self._download(key, local)
            yield from read_rows(local, display, partition_key, chunk_rows)

    def _download(self, key: str, local: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        partial = local.with_name(f".{local.name}.partial")  # complete or absent under its own name
        try:
            self._client().download_file(self.bucket, key, str(partial))
        except (BotoCoreError, ClientError) as exc:  # gone since it was listed, or not ours to read
            raise SourceError(f"s3://{self.bucket}/{key} cannot be downloaded: {exc}") from None
        partial.rename(local)


def _stat_fingerprint(stat: os.stat_result) -> str:
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def _etag(head_or_listing_entry: dict[str, Any]) -> str:
    return str(head_or_listing_entry["ETag"]).strip('"')


def _wanted(name: str, pattern: str) -> bool:
    return fnmatch.fnmatch(name, pattern) and os.path.splitext(name)[1].lower() in FORMATS


def read_rows(path: Path, display: str, partition_key: str, chunk_rows: int) -> Iterator[pa.Table]:
    """A file's rows in chunks, each with a ``row_id`` column; errors name ``display``."""
    seen: set = set()
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
    if offset == 0:
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
        with open(path, encoding="utf-8") as text:
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
    with open(path, encoding="utf-8") as f:
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
    with open(path, encoding="utf-8") as f:
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
