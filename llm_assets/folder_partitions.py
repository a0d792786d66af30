"""Sources whose partitions are folders: ``partition_by="folder"`` on a local folder or S3 prefix.

A Parquet dataset as Spark, Hive, Ray Data or pyarrow write it keeps one folder per partition
value (``date=2026-12-01/part-0.parquet``, ``part-1.parquet``, ...; nested for several keys:
``year=2026/month=12/``). With ``partition_by="folder"`` each folder that holds input files is one
partition, its key the folder's path relative to the source (``date=2026-12-01``); its files are
read in name order. Files directly in the source's root belong to no partition (a dataset keeps
its metadata there), and names starting with ``_`` or ``.`` are skipped (``_SUCCESS``,
``_common_metadata``, checksums), as Ray Data's and pyarrow's readers skip them.

A row's id is its file's path within the source and its position there
(``date=2026-12-01/part-0.parquet:17``, as a file partition's rows are ``file:17``), or the
files' own ``row_id`` column, unique across the folder. Each ``key=value`` part of the folder's
path becomes a string column (``date``), as Ray Data's Hive partitioning adds it, unless the
files already have that column. A folder's fingerprint covers every input file in it (names and
sizes and modification times, or S3 ETags): a file added, removed or rewritten makes the partition
stale, and the sensor runs it again.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Iterator, Optional

import pyarrow as pa

from llm_assets.errors import SourceError

PARTITION_BY = ("file", "folder")


def check_partition_by(value: str) -> None:
    if value not in PARTITION_BY:
        raise ValueError(
            f"partition_by={value!r}: expected 'file' (one partition per file) or 'folder' (one per folder "
            "of files, as a Hive-style date=2026-12-01/ folder)"
        )


def partition_unit(source) -> str:
    """What one partition of the source is, in words (descriptions in the UI)."""
    return "folder of files" if getattr(source, "partition_by", "file") == "folder" else "file"


def hidden(relative_path: str) -> bool:
    """A name a dataset's readers skip: ``_SUCCESS``, ``_common_metadata``, ``.part-0.crc``."""
    return any(part.startswith(("_", ".")) for part in relative_path.split("/"))


def folder_of(relative_path: str) -> Optional[str]:
    """The partition (folder) a file belongs to; None for a file in the source's root."""
    folder, _, _ = relative_path.rpartition("/")
    return folder or None


def group_by_folder(relative_paths: Iterable[str]) -> dict[str, list[str]]:
    """Folder -> its files' paths (relative to the source), in name order; root files left out."""
    groups: dict[str, list[str]] = {}
    for path in sorted(relative_paths):
        folder = folder_of(path)
        if folder is not None and not hidden(path):
            groups.setdefault(folder, []).append(path)
    return groups


def fingerprint(entries: Iterable[tuple[str, str]]) -> str:
    """A folder's fingerprint from its files' (relative path, file fingerprint) pairs."""
    pairs = sorted(entries)
    digest = hashlib.sha256("\n".join(f"{path}\t{version}" for path, version in pairs).encode()).hexdigest()
    return f"{len(pairs)} files:{digest[:24]}"


def read_folder(
    folder: str,
    files: list[str],
    read_file: Callable[[str, set], Iterator[pa.Table]],
    location: str,
) -> Iterator[pa.Table]:
    """The folder's rows, file after file, with the Hive columns of its path. ``read_file(path,
    seen)`` reads one file (relative path) as ``file_rows.read_rows`` does, sharing ``seen`` row ids."""
    columns = hive_columns(folder)
    seen: set = set()
    rows = 0
    for path in files:
        for table in read_file(path, seen):
            for name, value in columns.items():
                if name not in table.column_names:
                    table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
            rows += table.num_rows
            yield table
    if rows == 0:
        raise SourceError(f"the folder {folder!r} of {location} has no rows: a partition needs at least one row")


def hive_columns(folder: str) -> dict[str, str]:
    """``year=2026/month=12`` -> {"year": "2026", "month": "12"}; parts without ``=`` add nothing."""
    return dict(part.split("=", 1) for part in folder.split("/") if "=" in part and not part.startswith("="))
