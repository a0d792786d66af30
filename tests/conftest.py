"""Shared fixtures: a tiny real Llama model built offline, one local Ray for the session, and a
Dagster instance with dynamic partitions.

The tiny model is random (its answers are noise) but it is a real model that vLLM's CPU build
loads and runs: the tests exercise the real engine, tokenizer and chat template.
"""

from __future__ import annotations

import json
import os
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
def ray_session():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, namespace="llm_assets_tests")
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


def questions(n: int, prefix: str = "q") -> list[dict]:
    return [{"question": f"{prefix} number {i}: say something about the number {i}"} for i in range(n)]
