"""OpenAI Batch output: the files OpenAI writes for a batch, each whole or not at all.

Following OpenAI's documentation (the batch's ``output_file_id`` holds "the outputs of
successfully executed requests", its ``error_file_id`` "the outputs of requests with errors"),
each custom_id appears in exactly one of them: a successful row in the output file, a failed row
(``__inference_error__`` set) only in the error file (``results`` makes the lines). Unlike OpenAI,
which creates no error file for a batch without errors, the error file is always written (empty
then), so a re-export never leaves a stale error file from an earlier attempt next to a fresh
output file.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tempfile
import time
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from llm_assets.openai_batch.results import output_line
from llm_assets.rows import ERROR_COLUMN, ROW_ID

logger = logging.getLogger(__name__)


def export_openai_batch(
    batches: Iterable[pa.Table],
    filesystem: pafs.FileSystem,
    output_path: str,
    error_path: str,
    default_model: str,
    created: int | None = None,
) -> dict[str, int]:
    """Write the OpenAI Batch output file (successful rows) and error file (failed rows) from the
    final stage's batches, in their order. Each file appears whole or not at all. Returns
    ``{"total", "completed", "failed"}``, like a batch's ``request_counts``.

    ``created`` (Unix seconds, default now) goes into every body; the ids are hashes of
    ``output_path`` and the custom_id, so a re-export writes the same ids, and one custom_id used
    in two input files gets two ids.
    """
    if output_path == error_path:
        raise ValueError(f"output_path and error_path are both {output_path!r}: they must differ")
    created = int(time.time()) if created is None else created
    counts = {"total": 0, "completed": 0, "failed": 0}
    staged: list[_StagedFile] = []
    try:
        output = _StagedFile(filesystem, output_path)
        staged.append(output)
        errors = _StagedFile(filesystem, error_path)
        staged.append(errors)
        for batch in batches:
            ok_lines, error_lines = [], []
            for row in _rows_for_export(batch):
                line = output_line(row, default_model, created, output_path)
                (ok_lines if line["response"]["status_code"] == 200 else error_lines).append(line)
            output.write(ok_lines)
            errors.write(error_lines)
            counts["completed"] += len(ok_lines)
            counts["failed"] += len(error_lines)
        # The output file last: once it is there, so is its error file.
        errors.publish()
        output.publish()
    finally:
        for file in staged:
            file.discard()
    counts["total"] = counts["completed"] + counts["failed"]
    return counts


_EXPORT_COLUMNS = (ROW_ID, "generated_text", "num_input_tokens", "num_generated_tokens", "finish_reason")
_EMBEDDING_COLUMNS = (ROW_ID, "embeddings", "num_input_tokens")
# sampling_params says whether a row asked for log probabilities; generated_tokens tells the sampled
# token among each position's logprobs entries.
_OPTIONAL_COLUMNS = (ERROR_COLUMN, "openai_url", "openai_model", "sampling_params", "generated_tokens", "logprobs")


def _rows_for_export(batch: pa.Table) -> list[dict[str, Any]]:
    needed = _EMBEDDING_COLUMNS if "embeddings" in batch.column_names else _EXPORT_COLUMNS
    missing = [name for name in needed if name not in batch.column_names]
    if missing:
        raise ValueError(
            f"cannot export an OpenAI batch file: the rows have no {missing} column(s) (columns: {batch.column_names})"
        )
    present = [name for name in needed + _OPTIONAL_COLUMNS if name in batch.column_names]
    return batch.select(present).to_pylist()


# Object stores have no rename, but an object written through open_output_stream appears only
# when the stream closes, complete: there the file is staged locally and uploaded in one stream.
_OBJECT_STORES = {"s3", "gcs", "abfs"}


class _StagedFile:
    """A file that becomes visible at ``path`` only on ``publish()``: written to a temporary file
    beside it and renamed into place, or on an object store spooled locally and uploaded in one go
    (a failed run then never leaves a partial object behind)."""

    def __init__(self, filesystem: pafs.FileSystem, path: str):
        self.filesystem, self.path = filesystem, path
        self.temp_path: str | None = None
        if _base(filesystem).type_name in _OBJECT_STORES:
            # Held open across writes until publish or discard, which close (and so delete) it.
            self.stream: Any = tempfile.TemporaryFile(prefix="llm-assets-openai-batch-")  # noqa: SIM115
        else:
            parent, name = posixpath.split(path)
            if parent:
                filesystem.create_dir(parent, recursive=True)
            self.temp_path = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
            self.stream = filesystem.open_output_stream(self.temp_path)
        self.published = False

    def write(self, lines: list[dict[str, Any]]) -> None:
        if lines:
            self.stream.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8"))

    def publish(self) -> None:
        if self.temp_path is None:
            self.stream.seek(0)
            with self.filesystem.open_output_stream(self.path) as out:
                while chunk := self.stream.read(8 << 20):
                    out.write(chunk)
            self.stream.close()
        else:
            self.stream.close()
            self.filesystem.move(self.temp_path, self.path)
        self.published = True

    def discard(self) -> None:
        """Drop what was staged but not published (after an error); a no-op after publish."""
        if self.published:
            return
        self.stream.close()
        if self.temp_path is not None:
            try:
                self.filesystem.delete_file(self.temp_path)
            except FileNotFoundError:
                # Swallowed: discard runs in export_openai_batch's finally, so raising here would
                # hide the error being handled, and a temporary file already gone needs no deleting.
                logger.debug("staged file %s was already gone when discarded", self.temp_path)


def _base(filesystem: pafs.FileSystem) -> pafs.FileSystem:
    while isinstance(filesystem, pafs.SubTreeFileSystem):
        filesystem = filesystem.base_fs
    return filesystem
