"""Writing a file so that it appears only once complete: the one way every output is written.

Locally through a dot-named temporary file renamed into place (a rename is atomic on one disk); on
an object store (S3) as one upload, since an object becomes visible only once its upload is done.
Used by the Ray tasks that write stage outputs, so it imports nothing heavier than pyarrow.
"""

from __future__ import annotations

import uuid
from typing import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def write_atomically(fs: pafs.FileSystem, path: str, write: Callable) -> None:
    """Call ``write(stream)``; ``path`` appears only once the stream is complete."""
    if isinstance(fs, pafs.LocalFileSystem):
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open_output_stream(tmp) as out:
            write(out)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            write(out)


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    write_atomically(fs, path, lambda out: pq.write_table(table, out))
