"""The optional export of a pipeline's results as OpenAI Batch API output files.

For each partition, the first stage with ``generated_text`` (Detokenize, or the engine without
it) is written as ``{destination}/{partition stem}.output.jsonl`` (one line per successful
custom_id) and ``.errors.jsonl`` (failed rows), the files OpenAI's Batch API returns. The
destination is a local folder or ``s3://bucket/prefix`` (with the storage resource's S3
settings). Re-exporting replaces both files whole.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import PurePosixPath
from typing import Callable

import pyarrow.fs as pafs

from llm_assets import openai_batch
from llm_assets.pipeline import LLMPipeline
from llm_assets.s3 import pyarrow_s3, split_s3_uri

EXPORT = "openai_batch_output"


def destination(uri: str, storage) -> tuple[pafs.FileSystem, str]:
    if uri.startswith("s3://"):
        bucket, prefix = split_s3_uri(uri)
        return pyarrow_s3(storage.s3), f"{bucket}/{prefix}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def export_partitions(pipeline: LLMPipeline, partitions: list[str], storage, log: Callable[[str], None]) -> list[dict]:
    fs, root = destination(pipeline.openai_batch_output, storage)
    stage = pipeline.text_stage()
    # The model's folder name; an engine without a model of its own (HTTP) names its URL.
    model_source = pipeline.engine.model_source()
    model = PurePosixPath(model_source).name if model_source else pipeline.engine.target()
    results = []
    for partition in partitions:
        stem = posixpath.splitext(partition)[0]
        output, errors = f"{root}/{stem}.output.jsonl", f"{root}/{stem}.errors.jsonl"
        if isinstance(fs, pafs.LocalFileSystem):  # object stores need no folders
            fs.create_dir(posixpath.dirname(output), recursive=True)
        counts = openai_batch.export_openai_batch(
            storage.read_committed(pipeline.name, stage, partition), fs, output, errors, model
        )
        uri = storage.uri(output) if pipeline.openai_batch_output.startswith("s3://") else output
        log(f"{EXPORT} [{partition}]: {counts['completed']} completed, {counts['failed']} failed -> {uri}")
        results.append({**counts, "partition": partition, "path": uri})
    return results
