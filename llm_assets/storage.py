"""Where stage outputs live: one folder per (pipeline, stage, partition), committed atomically.

Layout::

    {root}/{pipeline}/{stage}/{partition}/_manifest.json        <- written last: the commit
    {root}/{pipeline}/{stage}/{partition}/{attempt}/_attempt.json  what the attempt computes from
    {root}/{pipeline}/{stage}/{partition}/{attempt}/part-00000-<session>.parquet

A run writes each batch of a stage's output as its own Parquet file into a fresh attempt folder,
from the Ray task that computed it (writes never queue on the driver); a file appears under its
final name only once complete (local: written under a dot-name, then renamed; S3: an object is
visible only once its upload is done). The manifest (listing those files, row counts and stats)
is written last, the same way: readers read only the files a manifest lists, so a half-written
attempt is never seen, and a failed attempt leaves the last committed output untouched.
``root`` is a local folder or ``s3://bucket/prefix``.

Resume: an uncommitted attempt whose ``_attempt.json`` (code version and input) matches what a
later run would compute is adopted by it: its complete files stay, only the rows they lack are
computed again (the engine stage does this; see ``execution/plan.py``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional
from urllib.parse import quote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from llm_assets.atomic import write_atomically
from llm_assets.s3 import pyarrow_s3, split_s3_uri

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
    file_rows: list[int] = field(default_factory=list)  # rows of each file, in order (empty in old manifests)


# Reads of a manifest that parse badly before one is given up on (see read_manifest).
MANIFEST_READS = 5


def read_manifest(fs: pafs.FileSystem, partition_dir: str) -> Optional[Manifest]:
    """The partition's manifest, or None. A store whose overwrite is not atomic for readers (the
    local S3 endpoint of the tests, some S3-compatible servers) can hand a reader half of a
    manifest that a concurrent commit is replacing: that read is made again, a few times, before
    the error is raised naming the file."""
    path = f"{partition_dir}/{MANIFEST}"
    reads = 0
    while True:
        reads += 1
        try:
            with fs.open_input_stream(path) as f:
                body = f.read()
        except FileNotFoundError:
            return None
        try:
            return Manifest(**json.loads(body))
        except json.JSONDecodeError as exc:
            if reads == MANIFEST_READS:
                raise ValueError(f"{path} is not valid JSON after {reads} reads: {exc}") from exc
        time.sleep(0.05 * reads)


def new_attempt_name() -> str:
    return f"attempt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


class PartitionStore:
    """Stage outputs as Parquet, per pipeline, stage and partition, under ``root`` (a local
    folder, or ``s3://bucket/prefix`` read with ``s3``'s endpoint and credentials: a dagster-aws
    ``S3Resource``, or None for the AWS environment). Picklable: Ray tasks get it. Imports no
    Dagster (``llm_assets.resources.PartitionStorage`` is its Dagster resource)."""

    def __init__(self, root: str, s3: Optional[Any] = None):
        self.root, self.s3 = root, s3
        self._cached: Optional[tuple[pafs.FileSystem, str]] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "s3": self.s3}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        if self._cached is None:
            if self.root.startswith("s3://"):
                bucket, prefix = split_s3_uri(self.root)
                self._cached = pyarrow_s3(self.s3), f"{bucket}/{prefix}".rstrip("/")
            else:
                self._cached = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(self.root))
        return self._cached

    def uri(self, path: str) -> str:
        """A path of this storage as users write it (s3://... on S3)."""
        return f"s3://{path}" if self.root.startswith("s3://") else path

    def partition_dir(self, pipeline: str, stage: str, partition: str) -> str:
        _, root = self._fs()
        # Partition keys come from file names; quote anything a path cannot hold.
        return f"{root}/{pipeline}/{stage}/{quote(partition, safe='')}"

    def filesystem(self) -> pafs.FileSystem:
        return self._fs()[0]

    def response_cache_dir(self, scope: str) -> str:
        """Where the response cache keeps the answers of one scope (model, engine, settings):
        beside the pipelines, so pipelines on the same model share it."""
        return f"{self._fs()[1]}/_response_cache/{scope}"

    def manifest(self, pipeline: str, stage: str, partition: str) -> Optional[Manifest]:
        return read_manifest(self.filesystem(), self.partition_dir(pipeline, stage, partition))

    def committed(
        self, pipeline: str, stage: str, partition: str, manifest: Optional[Manifest] = None
    ) -> tuple[Manifest, list[str]]:
        """The partition's manifest and the paths of its committed Parquet files (one manifest
        read, none when the caller has read ``manifest`` already); raises if the partition was
        never committed."""
        manifest = manifest or self.manifest(pipeline, stage, partition)
        if manifest is None:
            raise NotMaterializedError(
                f"{pipeline}/{stage} has no committed output for partition {partition!r}: "
                f"materialize {pipeline}/{stage} for it first"
            )
        base = self.partition_dir(pipeline, stage, partition)
        return manifest, [f"{base}/{name}" for name in manifest.files]

    def committed_files(self, pipeline: str, stage: str, partition: str) -> list[str]:
        return self.committed(pipeline, stage, partition)[1]

    def read_committed(
        self, pipeline: str, stage: str, partition: str, columns: Optional[list[str]] = None
    ) -> Iterator[pa.Table]:
        """The partition's committed rows, streamed in record batches (a file at a time, never
        the whole partition); ``columns``: only those of them a file has."""
        fs = self.filesystem()
        for path in self.committed_files(pipeline, stage, partition):
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                present = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
                for batch in parquet.iter_batches(columns=present):
                    yield pa.Table.from_batches([batch])

    def create_attempt(
        self, pipeline: str, stage: str, partition: str, attempt: str, info: Optional[dict[str, Any]] = None
    ) -> None:
        """Create the attempt folder (named by ``new_attempt_name()``) for the partition's output;
        ``info`` (what it computes from) is recorded in it so that a later run may adopt it."""
        create_attempt_folder(self.filesystem(), f"{self.partition_dir(pipeline, stage, partition)}/{attempt}", info)

    def commit(
        self,
        pipeline: str,
        stage: str,
        partition: str,
        attempt: str,
        files: list[str],
        file_rows: list[int],
        stats: dict[str, Any],
    ) -> Manifest:
        """Make the attempt's ``files`` (names relative to the partition folder) the partition's
        committed output, then delete the attempt it replaced."""
        fs = self.filesystem()
        base = self.partition_dir(pipeline, stage, partition)
        previous = read_manifest(fs, base)
        manifest = Manifest(
            files=list(files),
            rows=sum(file_rows),
            attempt=attempt,
            committed_at=time.time(),
            stats=stats,
            file_rows=list(file_rows),
        )
        body = json.dumps(manifest.__dict__, indent=1).encode()
        write_atomically(fs, f"{base}/{MANIFEST}", lambda out: out.write(body))
        # A concurrent writer's commit may have replaced ours already; its files are never the
        # ones deleted here.
        if previous is not None and previous.attempt != attempt:
            try:
                fs.delete_dir(f"{base}/{previous.attempt}")
            except FileNotFoundError:  # a concurrent commit deleted it first
                pass
        return manifest

    def resumable_attempt(
        self, pipeline: str, stage: str, partition: str, info: dict[str, Any]
    ) -> Optional[tuple[str, list[str], list[int]]]:
        """The newest uncommitted attempt of the partition computed from ``info``, with its
        complete part files (names relative to the partition folder, in order) and their rows."""
        fs = self.filesystem()
        base = self.partition_dir(pipeline, stage, partition)
        committed = read_manifest(fs, base)
        entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        attempts = sorted(
            (e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("attempt-")),
            reverse=True,  # names start with their creation time
        )
        for attempt in attempts:
            if committed is not None and attempt == committed.attempt:
                continue
            try:
                with fs.open_input_stream(f"{base}/{attempt}/{ATTEMPT_INFO}") as f:
                    if json.loads(f.read()) != info:
                        continue
            except FileNotFoundError:  # an attempt that records nothing cannot be adopted
                continue
            files = fs.get_file_info(pafs.FileSelector(f"{base}/{attempt}"))
            names = sorted(
                f"{attempt}/{e.base_name}"
                for e in files
                if e.base_name.startswith("part-") and e.base_name.endswith(".parquet")
            )
            if not names:  # nothing written yet (a run that ended early): an older attempt may have files
                continue
            rows = [pq.ParquetFile(f"{base}/{name}", filesystem=fs).metadata.num_rows for name in names]
            return attempt, names, rows
        return None


def create_attempt_folder(fs: pafs.FileSystem, folder: str, info: Optional[dict[str, Any]] = None) -> None:
    """An attempt folder (full path), with ``info`` recorded in it (what it computes from)."""
    fs.create_dir(folder, recursive=True)
    if info is not None:
        body = json.dumps(info).encode()
        write_atomically(fs, f"{folder}/{ATTEMPT_INFO}", lambda out: out.write(body))
