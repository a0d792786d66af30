"""Upload a model folder to S3, for ``model_source="s3://bucket/prefix"``.

    python -m llm_assets.upload_model --model-source DIR --bucket-uri s3://bucket/prefix [--endpoint-url URL]

``--model-source`` takes what a pipeline's ``model_source`` takes locally: a model folder, or a
``.gguf`` file (converted once into the model cache, as a run does, and that folder uploaded).
Credentials come from the standard AWS configuration (environment, profile, instance role),
never from the command line, where they would land in shell histories and process lists.

An object already there with the same size and ETag is skipped, so an interrupted upload is
resumed by running the command again. Parts are a fixed size, so a file's multipart ETag can be
computed here and compared. The files the model cache adds for itself are not uploaded.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Optional

from llm_assets.model_store import MB, PART_SUFFIX, RECORD, S3Access, TransferProgress, split_s3_uri
from llm_assets.models import DONE_MARKER, ModelSourceError, resolve_model_source

PART_BYTES = 64 * 1024 * 1024  # multipart threshold and part size: both, so ETags can be computed
OWN_FILES = (RECORD, DONE_MARKER)


def local_etag(path: Path) -> str:
    """The ETag S3 gives ``path`` uploaded with ``PART_BYTES`` parts: the MD5 of a single-part
    object, else the MD5 of the parts' MD5s and the part count."""
    digests = []
    with path.open("rb") as f:
        while chunk := f.read(PART_BYTES):
            digests.append(hashlib.md5(chunk))
    if len(digests) <= 1:
        return (digests[0] if digests else hashlib.md5()).hexdigest()
    return f"{hashlib.md5(b''.join(d.digest() for d in digests)).hexdigest()}-{len(digests)}"


def model_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name not in OWN_FILES and not p.name.endswith(PART_SUFFIX)
    )


def upload(folder: Path, bucket_uri: str, access: S3Access, log=print) -> dict[str, int]:
    """Upload every file of ``folder`` under ``bucket_uri``; returns the counts of files uploaded
    and skipped (already there with the same size and ETag)."""
    from boto3.s3.transfer import TransferConfig

    bucket, prefix = split_s3_uri(bucket_uri)
    client = access.client()
    there = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        there.update({entry["Key"]: (entry["Size"], entry["ETag"].strip('"')) for entry in page.get("Contents", [])})
    files = model_files(folder)
    todo = []
    for path in files:
        key = "/".join(filter(None, [prefix, path.relative_to(folder).as_posix()]))
        size = path.stat().st_size
        if there.get(key, (None, None))[0] == size and there[key][1] == local_etag(path):
            continue
        todo.append((path, key, size))
    log(
        f"{bucket_uri}: {len(files) - len(todo)} of {len(files)} files already there with the same size and ETag; "
        f"uploading {len(todo)} ({sum(size for _, _, size in todo) / MB:.1f} MB)"
    )
    progress = TransferProgress("Uploading", bucket_uri, len(todo), sum(size for _, _, size in todo), log)
    config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES)
    for path, key, _ in todo:
        client.upload_file(str(path), bucket, key, Config=config, Callback=progress.add)
        progress.file_done()
    if todo:
        progress.finish(f"from {folder}")
    return {"uploaded": len(todo), "skipped": len(files) - len(todo)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_assets.upload_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-source", required=True, help="a local model folder, or a .gguf file (converted first)")
    parser.add_argument("--bucket-uri", required=True, help="s3://bucket/prefix: the model_source pipelines then name")
    parser.add_argument("--endpoint-url", help="an S3-compatible endpoint (default: AWS, or AWS_ENDPOINT_URL_S3)")
    parser.add_argument("--region", help="the bucket's region (default: the AWS configuration's)")
    args = parser.parse_args(argv)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        folder = Path(resolve_model_source(args.model_source, log=print))
        if not folder.is_dir():
            raise ModelSourceError(
                f"--model-source {args.model_source!r}: expected a local model folder or a .gguf file"
            )
        started = time.monotonic()
        counts = upload(folder, args.bucket_uri, S3Access(endpoint_url=args.endpoint_url, region_name=args.region))
    except (ModelSourceError, ValueError, BotoCoreError, ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.bucket_uri}: {counts['uploaded']} files uploaded, {counts['skipped']} already there "
        f"({time.monotonic() - started:.1f} s); use model_source={args.bucket_uri!r}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
