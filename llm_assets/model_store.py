"""Models on S3: ``model_source="s3://bucket/prefix"`` is copied once per node into the model cache.

Why it works this way:

- **Where the download happens.** The run's driver resolves every model before any stage starts
  (``execution/run.py``): it lists the prefix once (names, sizes, ETags) and downloads the
  files on its node before any engine builds, with progress in the run's log. The tokenizer stages
  and engine actors get an ``S3ModelPath``: a ``str`` holding the driver's folder (every check and
  log line taking a model path works unchanged) that also carries the listing and the S3 settings.
  A process on another node calls ``model_on_this_node`` before loading anything and gets the
  version the driver listed from its node's own cache, downloading it there first if need be (its
  log lines go to its Ray worker log); on the driver's node that costs a few ``stat`` calls.
- **Once per node.** A file lock per cache entry: concurrent processes of one node (the engine
  actor and several tokenizer tasks) download once; the others wait for it, then find the files.
- **Cache key.** The bucket, the prefix and every object's ETag: a model replaced in S3 is a new
  cache entry, never files of two versions mixed. Files get their objects' modification times (the
  record the latest), so the folder's fingerprint (the response cache's scope,
  ``versions.folder_fingerprint``) is the same on every node, wherever the cache is.
- **Resume.** Each object is written under a temporary name and renamed when complete, then
  recorded (size and ETag) in ``RECORD``; a download that stopped leaves complete files and at
  most a temporary one: the next one skips what is recorded and present with its size.
- **Credentials.** ``EnginePoolResource(model_s3=S3Resource(...))`` gives the endpoint, region and
  credentials; they travel inside the ``S3ModelPath`` as a task or actor argument, never in a Ray
  runtime_env (Ray logs those, see ``secret_env.py``), and no repr shows them. Without it each
  process uses the standard AWS configuration of its node (environment, profile, instance role;
  ``AWS_ENDPOINT_URL_S3`` for another endpoint).
- **Code versions** name the model by its ``model_source`` (the S3 URI), never by a local path: the
  same model cached elsewhere keeps every stage up to date. As with a local folder, a model
  replaced under the same URI leaves committed outputs up to date (the response cache's scope
  changes with its files).
- **Streaming the weights** (vLLM's ``load_format="runai_streamer"``) is not built: the package is
  not installed here (it is on PyPI), so nothing could test it; ``models.check_s3_load_format``
  refuses it at definition.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from llm_assets.model_cache import ModelSourceError, model_cache_dir
from llm_assets.s3 import S3Access
from llm_assets.s3 import split_s3_uri as split_uri

Log = Callable[[str], None]
RECORD = ".llm_assets_s3.json"  # name -> {"etag", "size"} of each complete file
PART_SUFFIX = ".llm_assets_part"  # a file being written
PROGRESS_EVERY_S = 5.0
MB = 1_000_000


@dataclass(frozen=True)
class S3Object:
    name: str  # relative to the model's prefix: the file's path in the model folder
    key: str
    size: int
    etag: str
    modified: float  # seconds since the epoch


@dataclass(frozen=True)
class S3Model:
    """One version of a model folder on S3: what the driver listed."""

    uri: str
    objects: tuple[S3Object, ...]
    access: S3Access = field(default_factory=S3Access)

    @property
    def bucket(self) -> str:
        return split_s3_uri(self.uri)[0]

    @property
    def folder_name(self) -> str:
        bucket, prefix = split_s3_uri(self.uri)
        version = hashlib.sha256(
            json.dumps([bucket, prefix, sorted((o.name, o.etag) for o in self.objects)]).encode()
        ).hexdigest()
        return f"s3-{bucket}-{prefix.rsplit('/', 1)[-1] or 'root'}-{version[:12]}"

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix'), or a ModelSourceError."""
    try:
        return split_uri(uri)
    except ValueError:
        raise ModelSourceError(f"{uri!r} is not an s3://bucket/prefix URI") from None


def list_model(uri: str, access: S3Access) -> S3Model:
    """The objects under ``uri`` (a folder: ``s3://bucket/prefix``), checked to be a model folder."""
    model = list_folder(uri, access)
    objects = model.objects
    if not any(o.name == "config.json" for o in objects):
        found = f"{len(objects)} objects, none named config.json" if objects else "no objects"
        raise ModelSourceError(
            f"model_source {uri!r}: {found} under it: expected a Hugging Face model folder "
            "(upload one with `python -m llm_assets.upload_model`)"
        )
    return model


def list_folder(uri: str, access: S3Access, setting: str = "model_source") -> S3Model:
    """The objects under ``uri`` as a folder to download with ``fetch`` (a model's, a LoRA
    adapter's: the caller checks what it must hold); errors name ``setting``."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(uri)
    start = f"{prefix}/" if prefix else ""
    objects = []
    try:
        for page in access.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
            for entry in page.get("Contents", []):
                name = entry["Key"][len(start) :]
                if name and not name.endswith("/"):  # "folder" marker objects hold nothing
                    objects.append(
                        S3Object(
                            name,
                            entry["Key"],
                            entry["Size"],
                            entry["ETag"].strip('"'),
                            entry["LastModified"].timestamp(),
                        )
                    )
    except (BotoCoreError, ClientError) as exc:
        raise ModelSourceError(f"{setting} {uri!r}: cannot list it: {exc}") from exc
    bad = [o.name for o in objects if ".." in o.name.split("/")]
    if bad:
        raise ModelSourceError(f"{setting} {uri!r}: object names that leave the folder: {bad[:3]}")
    return S3Model(uri, tuple(sorted(objects, key=lambda o: o.name)), access)


def _record(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((folder / RECORD).read_text())
    except FileNotFoundError:
        return {}


def _complete_files(folder: Path, model: S3Model) -> list[S3Object]:
    """The model's objects already here: recorded with their ETag, and present with their size."""
    record = _record(folder)
    done = []
    for obj in model.objects:
        entry = record.get(obj.name)
        path = folder / obj.name
        if entry and entry["etag"] == obj.etag and path.is_file() and path.stat().st_size == obj.size:
            done.append(obj)
    return done


def is_complete(folder: Path, model: S3Model) -> bool:
    return len(_complete_files(folder, model)) == len(model.objects)


def fetch(model: S3Model, log: Log = print, cache_root: Optional[Path] = None) -> Path:
    """The model's folder in this node's cache, downloaded (or completed) now if need be."""
    from filelock import FileLock, Timeout

    folder = (cache_root or model_cache_dir()) / model.folder_name
    if is_complete(folder, model):
        log(f"{model.uri}: using the copy in {folder} (downloaded before)")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"{model.uri}: another process of this node is downloading it into {folder}; waiting for it")
        lock.acquire()
    try:
        if is_complete(folder, model):
            log(f"{model.uri}: using the copy in {folder} (downloaded by another process)")
        else:
            _download(model, folder, log)
    finally:
        lock.release()
    return folder


def _download(model: S3Model, folder: Path, log: Log) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    for leftover in folder.rglob(f"*{PART_SUFFIX}"):  # from a download that stopped
        leftover.unlink()
    done = {o.name for o in _complete_files(folder, model)}
    todo = [o for o in model.objects if o.name not in done]
    if done:
        log(
            f"{model.uri}: resuming the download into {folder}: "
            f"{len(done)} of {len(model.objects)} files are here already"
        )
    else:
        log(f"Downloading {model.uri} ({len(todo)} files, {model.size / MB:.1f} MB) into {folder}")
    record = _record(folder)
    client = model.access.client()
    progress = TransferProgress("Downloading", model.uri, len(todo), sum(o.size for o in todo), log)
    try:
        for obj in todo:
            path = folder / obj.name
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(path.name + PART_SUFFIX)
            client.download_file(model.bucket, obj.key, str(part), Callback=progress.add)
            etag = client.head_object(Bucket=model.bucket, Key=obj.key)["ETag"].strip('"')
            if etag != obj.etag or part.stat().st_size != obj.size:
                part.unlink()
                raise ModelSourceError(
                    f"{model.uri}: {obj.name} changed in S3 while it was being downloaded; run again"
                )
            os.utime(part, (obj.modified, obj.modified))  # the same fingerprint on every node (see above)
            os.replace(part, path)
            record[obj.name] = {"etag": obj.etag, "size": obj.size}
            _write_record(folder, record, model)
            progress.file_done()
    except (BotoCoreError, ClientError) as exc:
        raise ModelSourceError(
            f"{model.uri}: the download stopped ({exc}); the files already complete are kept, the next run resumes"
        ) from exc
    progress.finish(f"into {folder}")


def _write_record(folder: Path, record: dict, model: S3Model) -> None:
    tmp = folder / (RECORD + PART_SUFFIX)
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    latest = max(o.modified for o in model.objects)  # the folder's fingerprint: the same wherever it was downloaded
    os.utime(tmp, (latest, latest))
    os.replace(tmp, folder / RECORD)


class TransferProgress:
    """Bytes and files moved, logged every few seconds and at the end (boto3 reports bytes from
    its transfer threads: hence the lock)."""

    def __init__(self, verb: str, uri: str, files: int, total_bytes: int, log: Log):
        self.verb, self.uri, self.files, self.total, self.log = verb, uri, files, total_bytes, log
        self.bytes = self.files_done = 0
        self.started = self.reported = time.monotonic()
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.bytes += nbytes
            now = time.monotonic()
            if now - self.reported >= PROGRESS_EVERY_S:
                self.reported = now
                self.log(f"{self.verb} {self.uri}: {self._line(now)}")

    def file_done(self) -> None:
        with self.lock:
            self.files_done += 1

    def _line(self, now: float) -> str:
        rate = self.bytes / MB / max(now - self.started, 1e-6)
        return (
            f"{self.bytes / MB:.1f} of {self.total / MB:.1f} MB, {self.files_done} of {self.files} files, "
            f"{rate:.1f} MB/s"
        )

    def finish(self, where: str) -> None:
        now = time.monotonic()
        done = {"Downloading": "Downloaded", "Uploading": "Uploaded"}.get(self.verb, self.verb)
        self.log(f"{done} {self.uri} {where}: {self._line(now)}, in {now - self.started:.1f} s")


class S3ModelPath(str):
    """The driver's local copy of an S3 model, which any other node can get its own copy of: see
    the module's docstring. Its ``repr`` is the path's (the credentials it carries never show)."""

    model: S3Model

    def __new__(cls, path: str, model: S3Model) -> "S3ModelPath":
        self = super().__new__(cls, path)
        self.model = model
        return self

    def __reduce__(self):
        return S3ModelPath, (str(self), self.model)

    def on_this_node(self, log: Log = print) -> str:
        if is_complete(Path(self), self.model):  # the driver's node, or a folder every node shares
            return str(self)
        return str(fetch(self.model, log))


def model_on_this_node(model_source: Any, log: Log = print) -> Any:
    """The model folder to load in this process: an S3 model is downloaded to this node's cache
    first where it is not here yet; anything else is returned as it is."""
    return model_source.on_this_node(log) if isinstance(model_source, S3ModelPath) else model_source


def resolve_s3_model(uri: str, s3: Any = None, log: Log = print) -> S3ModelPath:
    """Run by the driver: list the model, download it on this node, and hand out its path."""
    model = list_model(uri, S3Access.of(s3))
    return S3ModelPath(str(fetch(model, log)), model)
