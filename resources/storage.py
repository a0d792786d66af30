"""Where stage outputs live: one folder per (pipeline, stage, partition), committed atomically.

Layout::

    {root}/{pipeline}/{stage}/{partition}/_manifest.json      <- written last: the commit
    {root}/{pipeline}/{stage}/{partition}/{attempt}/part-00000.parquet

Writers write Parquet into a fresh attempt folder; the manifest (listing those files, row count and
stats) is written last: locally through a temporary file renamed into place, on S3 as one PUT (an
S3 object becomes visible only once complete, so no rename is needed). Readers read only the files
a manifest lists, so a half-written attempt is never seen, and a failed attempt leaves the last
committed output untouched. ``root`` is a local folder or ``s3://bucket/prefix``.

Checkpoints (the engine stage): a checkpointed writer records what it computes from
(``_attempt.json``: code version and input) and closes its Parquet file at least every
``checkpoint_interval_s``; a part file appears under its final name only once complete (local:
written under a dot-name, then renamed; S3: an upload is visible only once done). A later run
with the same code version and input adopts the uncommitted attempt: its complete files stay, and
only the rows they lack are computed again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import quote

import dagster as dg
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field

from resources.s3 import S3Resource, pyarrow_s3, split_s3_uri

MANIFEST = "_manifest.json"
ATTEMPT_INFO = "_attempt.json"


class NotMaterializedError(RuntimeError):
    pass


@dataclass
class Manifest:
    files: list[str]
    rows: int
    attempt: str
    committed_at: float
    stats: dict[str, Any] = field(default_factory=dict)


class PartitionWriter:
    """Streams Arrow batches to Parquet files of one attempt; ``commit`` makes them visible.

    ``adopt`` continues an uncommitted attempt (its complete files are kept); ``checkpoint_every_s``
    closes the open file that often, so an interrupted run leaves complete files behind.
    """

    def __init__(self, fs: pafs.FileSystem, partition_dir: str, max_rows_per_file: int, checkpoint_every_s: Optional[float] = None, adopt: Optional[tuple[str, list[str], int]] = None):
        self.fs = fs
        self.partition_dir = partition_dir
        self.max_rows_per_file = max_rows_per_file
        self.checkpoint_every_s = checkpoint_every_s
        self.session = uuid.uuid4().hex[:8]  # part names of two writers adopting one attempt never clash
        if adopt is None:
            self.attempt = f"attempt-{time.strftime('%Y%m%dT%H%M%S')}-{self.session}"
            self.files: list[str] = []
            self.rows = 0
            fs.create_dir(f"{partition_dir}/{self.attempt}", recursive=True)
        else:
            self.attempt, self.files, self.rows = adopt[0], list(adopt[1]), adopt[2]
        self._writer: Optional[pq.ParquetWriter] = None
        self._open_name = ""
        self._rows_in_file = 0
        self._opened_at = 0.0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is not None and not table.schema.equals(self._writer.schema):
            table = self._conform(table)
        if self._writer is None or self._rows_in_file >= self.max_rows_per_file or self._checkpoint_due():
            self._roll(table.schema)
        self._writer.write_table(table)
        self._rows_in_file += table.num_rows
        self.rows += table.num_rows

    def _conform(self, table: pa.Table) -> pa.Table:
        """Cast to the open file's schema when only types differ (a column that was all-null in
        one batch); otherwise start a new file with the new schema."""
        schema = self._writer.schema
        if set(table.column_names) == set(schema.names):
            try:
                return table.select(schema.names).cast(schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                pass
        self._close_file()
        return table

    def _checkpoint_due(self) -> bool:
        return self.checkpoint_every_s is not None and time.monotonic() - self._opened_at >= self.checkpoint_every_s

    def _local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def _temporary_path(self) -> str:
        attempt, name = self._open_name.split("/")
        return f"{self.partition_dir}/{attempt}/.{name}.tmp"

    def _roll(self, schema: pa.Schema) -> None:
        self._close_file()
        self._open_name = f"{self.attempt}/part-{len(self.files):05d}-{self.session}.parquet"
        # Locally under a dot-name until complete: a killed writer leaves no torn part-* file.
        path = self._temporary_path() if self._local() else f"{self.partition_dir}/{self._open_name}"
        self._writer = pq.ParquetWriter(self.fs.open_output_stream(path), schema)
        self._rows_in_file = 0
        self._opened_at = time.monotonic()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if self._local():
                self.fs.move(self._temporary_path(), f"{self.partition_dir}/{self._open_name}")
            self.files.append(self._open_name)

    def write_attempt_info(self, info: dict[str, Any]) -> None:
        with self.fs.open_output_stream(f"{self.partition_dir}/{self.attempt}/{ATTEMPT_INFO}") as out:
            out.write(json.dumps(info).encode())

    def suspend(self) -> None:
        """Stop without committing, keeping the complete files for a later run to adopt."""
        self._close_file()

    def commit(self, stats: dict[str, Any]) -> Manifest:
        self._close_file()
        previous = read_manifest(self.fs, self.partition_dir)
        manifest = Manifest(files=self.files, rows=self.rows, attempt=self.attempt, committed_at=time.time(), stats=stats)
        body = json.dumps(manifest.__dict__, indent=1).encode()
        final = f"{self.partition_dir}/{MANIFEST}"
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{self.partition_dir}/.{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
            with self.fs.open_output_stream(tmp) as out:
                out.write(body)
            self.fs.move(tmp, final)  # rename: atomic on a local disk
        else:
            with self.fs.open_output_stream(final) as out:  # one object, visible only when whole
                out.write(body)
        # The attempt this commit replaced is garbage now (a concurrent writer's commit may have
        # replaced ours already; its files are never the ones deleted here).
        if previous is not None and previous.attempt != self.attempt:
            self._delete_dir(f"{self.partition_dir}/{previous.attempt}")
        return manifest

    def abort(self) -> None:
        self._close_file()
        self._delete_dir(f"{self.partition_dir}/{self.attempt}")

    def _delete_dir(self, path: str) -> None:
        try:
            self.fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass


def read_manifest(fs: pafs.FileSystem, partition_dir: str) -> Optional[Manifest]:
    try:
        with fs.open_input_stream(f"{partition_dir}/{MANIFEST}") as f:
            return Manifest(**json.loads(f.read()))
    except FileNotFoundError:
        return None


class PartitionStorage(dg.ConfigurableResource):
    """Stage outputs as Parquet, per pipeline, stage and partition, under ``root``."""

    root: str = Field(description="A local folder, or s3://bucket/prefix, for stage outputs.")
    s3: Optional[S3Resource] = Field(default=None, description="Endpoint, region and credentials for an s3:// root (default: the AWS environment).")
    max_rows_per_file: int = Field(default=500_000, description="Rows per Parquet file before a new one starts.")
    checkpoint_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="The engine stage closes its Parquet file at least this often: a run that is killed loses at most about this much generation; a re-run keeps the rest.",
    )

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        if self.root.startswith("s3://"):
            bucket, prefix = split_s3_uri(self.root)
            return pyarrow_s3(self.s3), f"{bucket}/{prefix}".rstrip("/")
        root = os.path.abspath(os.path.expanduser(self.root))
        return pafs.LocalFileSystem(), root

    def uri(self, path: str) -> str:
        """A path of this storage as users write it (s3://... on S3)."""
        return f"s3://{path}" if self.root.startswith("s3://") else path

    def partition_dir(self, pipeline: str, stage: str, partition: str) -> str:
        _, root = self._fs()
        # Partition keys come from file names; quote anything a path cannot hold.
        return f"{root}/{pipeline}/{stage}/{quote(partition, safe='')}"

    def filesystem(self) -> pafs.FileSystem:
        return self._fs()[0]

    def manifest(self, pipeline: str, stage: str, partition: str) -> Optional[Manifest]:
        return read_manifest(self.filesystem(), self.partition_dir(pipeline, stage, partition))

    def committed(self, pipeline: str, stage: str, partition: str) -> tuple[Manifest, list[str]]:
        """The partition's manifest and the paths of its committed Parquet files (one manifest
        read); raises if the partition was never committed."""
        manifest = self.manifest(pipeline, stage, partition)
        if manifest is None:
            raise NotMaterializedError(
                f"{pipeline}/{stage} has no committed output for partition {partition!r}: "
                f"materialize {pipeline}/{stage} for it first"
            )
        base = self.partition_dir(pipeline, stage, partition)
        return manifest, [f"{base}/{name}" for name in manifest.files]

    def committed_files(self, pipeline: str, stage: str, partition: str) -> list[str]:
        return self.committed(pipeline, stage, partition)[1]

    def writer(self, pipeline: str, stage: str, partition: str) -> PartitionWriter:
        return PartitionWriter(self.filesystem(), self.partition_dir(pipeline, stage, partition), self.max_rows_per_file)

    def resumable_writer(self, pipeline: str, stage: str, partition: str, info: dict[str, Any]) -> tuple[PartitionWriter, list[str]]:
        """A checkpointed writer, continuing the newest uncommitted attempt computed from the same
        ``info`` (code version, input) if there is one; returns it and the paths of the complete
        files it adopted (empty for a fresh attempt)."""
        fs = self.filesystem()
        base = self.partition_dir(pipeline, stage, partition)
        found = _resumable_attempt(fs, base, info)
        if found is None:
            writer = PartitionWriter(fs, base, self.max_rows_per_file, self.checkpoint_interval_s)
            writer.write_attempt_info(info)
            return writer, []
        attempt, names = found
        rows = sum(pq.ParquetFile(f"{base}/{name}", filesystem=fs).metadata.num_rows for name in names)
        writer = PartitionWriter(fs, base, self.max_rows_per_file, self.checkpoint_interval_s, adopt=(attempt, names, rows))
        return writer, [f"{base}/{name}" for name in names]


def _resumable_attempt(fs: pafs.FileSystem, partition_dir: str, info: dict[str, Any]) -> Optional[tuple[str, list[str]]]:
    """The newest uncommitted attempt of the partition whose ``_attempt.json`` equals ``info``,
    with its complete part files (in name order)."""
    committed = read_manifest(fs, partition_dir)
    try:
        entries = fs.get_file_info(pafs.FileSelector(partition_dir, allow_not_found=True))
    except FileNotFoundError:
        return None
    attempts = sorted(
        (e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("attempt-")),
        reverse=True,  # names start with their creation time
    )
    for attempt in attempts:
        if committed is not None and attempt == committed.attempt:
            continue
        try:
            with fs.open_input_stream(f"{partition_dir}/{attempt}/{ATTEMPT_INFO}") as f:
                if json.loads(f.read()) != info:
                    continue
        except (FileNotFoundError, ValueError):
            continue
        files = fs.get_file_info(pafs.FileSelector(f"{partition_dir}/{attempt}"))
        names = sorted(f"{attempt}/{e.base_name}" for e in files if e.base_name.startswith("part-") and e.base_name.endswith(".parquet"))
        return attempt, names
    return None
