"""Input sources: a landing location whose files become partitions (one dynamic partition per file,
or per folder of files with ``partition_by="folder"``: folder_partitions.py).

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
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa

from llm_assets import folder_partitions
from llm_assets.errors import SourceError  # also importable from here, as before
from llm_assets.file_rows import FORMATS, read_rows
from llm_assets.s3 import S3Access


@dataclass(frozen=True)
class LocalFolderSource:
    """Files matching ``pattern`` in ``folder``; the partition key is the file's name. With
    ``partition_by="folder"``: each subfolder holding such files is a partition, its key the
    subfolder's path (``date=2026-12-01``; see folder_partitions.py)."""

    folder: str
    pattern: str = "*.jsonl"
    partition_by: str = "file"

    def __post_init__(self):
        folder_partitions.check_partition_by(self.partition_by)

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
        if self.partition_by == "folder":
            return list(folder_partitions.group_by_folder(self._files_below()))
        return list(self.files())

    def _files_below(self) -> dict[str, Path]:
        """Every input file in the folder and its subfolders, by its path relative to the folder."""
        root = Path(self.folder).expanduser()
        if not root.is_dir():
            return {}
        return {
            path.relative_to(root).as_posix(): path
            for path in sorted(root.rglob("*"))
            if path.is_file() and _wanted(path.name, self.pattern)
        }

    def _folder_files(self, partition_key: str) -> dict[str, Path]:
        """A folder partition's input files, by path relative to the source, in name order."""
        folder = Path(self.folder).expanduser() / partition_key
        if ".." in partition_key.split("/") or not folder.is_dir():
            raise SourceError(f"no input folder {partition_key!r} in {self.folder}")
        files = {
            f"{partition_key}/{path.name}": path
            for path in sorted(folder.iterdir())
            if path.is_file() and _wanted(path.name, self.pattern) and not folder_partitions.hidden(path.name)
        }
        if not files:
            raise SourceError(f"no input files in {folder} (pattern {self.pattern!r})")
        return files

    def path_for(self, partition_key: str) -> Path:
        # The key is the file's name: one lookup, not a listing of the folder (a run plans every
        # partition, and listing per partition made planning 1 000 partitions take 20 s).
        path = Path(self.folder).expanduser() / partition_key
        if Path(partition_key).name != partition_key or not _wanted(partition_key, self.pattern) or not path.is_file():
            raise SourceError(f"no input file {partition_key!r} in {self.folder} (pattern {self.pattern!r})")
        return path

    def fingerprint(self, partition_key: str) -> str:
        """Changes when the file does (size and modification time), or any file of the folder."""
        if self.partition_by == "folder":
            files = self._folder_files(partition_key)
            return folder_partitions.fingerprint((key, _stat_fingerprint(path.stat())) for key, path in files.items())
        return _stat_fingerprint(self.path_for(partition_key).stat())

    def fingerprints(self) -> dict[str, str]:
        """Partition key -> fingerprint of every file, from one listing and a stat per file (no reads)."""
        if self.partition_by == "folder":
            files = self._files_below()
            return {
                folder: folder_partitions.fingerprint((key, _stat_fingerprint(files[key].stat())) for key in keys)
                for folder, keys in folder_partitions.group_by_folder(files).items()
            }
        return {key: _stat_fingerprint(path.stat()) for key, path in self.files().items()}

    def read(self, partition_key: str, chunk_rows: int = 1024, copies: Optional[str] = None) -> Iterator[pa.Table]:
        """The file's rows in chunks, each with a ``row_id`` column (``copies``: unused, the file is local)."""
        if self.partition_by == "folder":
            files = self._folder_files(partition_key)
            yield from folder_partitions.read_folder(
                partition_key,
                list(files),
                lambda key, seen: read_rows(files[key], str(files[key]), key, chunk_rows, seen=seen, may_be_empty=True),
                self.location,
            )
            return
        path = self.path_for(partition_key)
        yield from read_rows(path, str(path), partition_key, chunk_rows)


@dataclass(frozen=True)
class S3PrefixSource:
    """Objects under ``s3://bucket/prefix`` matching ``pattern``; the partition key is the object's
    key relative to the prefix (with ``partition_by="folder"``: the "folder" of the objects, as
    ``date=2026-12-01``). ``s3`` (a dagster-aws ``S3Resource``) gives the endpoint, region and
    credentials; without it boto3's defaults apply."""

    bucket: str
    prefix: str = ""
    pattern: str = "*.jsonl"
    s3: Optional[Any] = field(default=None, compare=False)
    partition_by: str = "file"

    def __post_init__(self):
        folder_partitions.check_partition_by(self.partition_by)

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
        return (type(self), (self.bucket, self.prefix, self.pattern, s3, self.partition_by))

    def _client(self):
        if isinstance(self.s3, S3Access):
            return self.s3.client()
        if self.s3 is not None:
            return self.s3.get_client()
        import boto3

        # A session of its own: boto3's default session is not safe to share between the
        # threads that plan a run's partitions.
        return boto3.session.Session().client("s3")

    def objects(self, below: str = "", delimiter: Optional[str] = None) -> dict[str, dict[str, Any]]:
        """The input objects' keys relative to the prefix -> their listing entries (Key, ETag, Size,
        ...); ``below``: only under that "folder"; ``delimiter="/"``: not in its subfolders."""
        prefix = self._prefix()
        found: dict[str, dict[str, Any]] = {}
        listing = {"Bucket": self.bucket, "Prefix": prefix + below, **({"Delimiter": delimiter} if delimiter else {})}
        pages = self._client().get_paginator("list_objects_v2").paginate(**listing)
        for page in pages:
            for entry in page.get("Contents", []):
                key = entry["Key"][len(prefix) :]
                if key and not key.endswith("/") and _wanted(key.rsplit("/", 1)[-1], self.pattern):
                    found[key] = entry
        return dict(sorted(found.items()))

    def partition_keys(self) -> list[str]:
        if self.partition_by == "folder":
            return list(folder_partitions.group_by_folder(self.objects()))
        return list(self.objects())

    def _folder_objects(self, partition_key: str) -> dict[str, dict[str, Any]]:
        """A folder partition's input objects (one listing of that folder alone), in name order."""
        found = self.objects(below=f"{partition_key}/", delimiter="/")
        files = {key: entry for key, entry in found.items() if not folder_partitions.hidden(key)}
        if not files:
            raise SourceError(f"no input objects under {self.location}{partition_key}/ (pattern {self.pattern!r})")
        return files

    def fingerprint(self, partition_key: str) -> str:
        """The object's ETag, from one HEAD request (not a listing of the whole prefix); a folder's
        from the ETags of its objects (one listing of that folder)."""
        if self.partition_by == "folder":
            objects = self._folder_objects(partition_key)
            return folder_partitions.fingerprint((key, _etag(entry)) for key, entry in objects.items())
        try:
            head = self._client().head_object(Bucket=self.bucket, Key=f"{self._prefix()}{partition_key}")
        except Exception as exc:  # botocore's ClientError for a missing object
            raise SourceError(f"no input object {partition_key!r} under {self.location}: {exc}") from None
        return _etag(head)

    def fingerprints(self) -> dict[str, str]:
        """Partition key -> ETag of every object, from one listing (which returns the ETags)."""
        objects = self.objects()
        if self.partition_by == "folder":
            return {
                folder: folder_partitions.fingerprint((key, _etag(objects[key])) for key in keys)
                for folder, keys in folder_partitions.group_by_folder(objects).items()
            }
        return {key: _etag(entry) for key, entry in objects.items()}

    def read(self, partition_key: str, chunk_rows: int = 1024, copies: Optional[str] = None) -> Iterator[pa.Table]:
        """Downloads the object to a local file (Parquet needs random access), then reads it in
        chunks like a local file; errors name the s3:// URI. With ``copies`` (a folder the caller
        keeps, e.g. for one run) the download is kept there and read again from there."""
        with tempfile.TemporaryDirectory(prefix="llm-assets-s3-") as tmp:
            folder = copies if copies is not None else tmp
            if self.partition_by == "folder":
                objects = list(self._folder_objects(partition_key))
                yield from folder_partitions.read_folder(
                    partition_key,
                    objects,
                    lambda key, seen: self._read_object(key, folder, chunk_rows, seen=seen, may_be_empty=True),
                    self.location,
                )
            else:
                yield from self._read_object(partition_key, folder, chunk_rows)

    def _read_object(self, relative_key: str, folder: str, chunk_rows: int, **read_options: Any) -> Iterator[pa.Table]:
        """One object's rows, downloaded into ``folder`` (kept there: read again from there)."""
        key = f"{self._prefix()}{relative_key}"
        local = Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}{Path(relative_key).suffix}"
        if not local.exists():
            self._download(key, local)
        yield from read_rows(local, f"s3://{self.bucket}/{key}", relative_key, chunk_rows, **read_options)

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
