"""The README's demo, as a user runs it: the CLI, `dagster job execute`, the real SmolLM2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent.parent


def test_dagster_job_execute_runs_the_demo_and_smollm2_answers(tmp_path):
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "LLM_ASSETS_STORAGE": str(tmp_path / "storage"),
        "PYTHONPATH": str(PROJECT),
    }
    Path(env["DAGSTER_HOME"]).mkdir()
    bin_dir = Path(sys.executable).parent
    added = subprocess.run(
        [sys.executable, "-m", "llm_assets.cli", "add-partitions", "-f", "definitions.py"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    assert "demo: 1 new partition(s) ['prompts.jsonl']" in added.stdout
    run = subprocess.run(
        [
            str(bin_dir / "dagster"),
            "job",
            "execute",
            "-f",
            "definitions.py",
            "-j",
            "demo_job",
            "--tags",
            json.dumps({"dagster/partition": "prompts.jsonl"}),
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "RUN_SUCCESS" in log
    assert log.count("Starting 1 vLLM engine actor(s)") == 1
    folder = tmp_path / "storage" / "demo" / "postprocess" / "prompts.jsonl"
    manifest = json.loads((folder / "_manifest.json").read_text())
    rows = pq.read_table([str(folder / name) for name in manifest["files"]]).to_pylist()
    answers = {row["question"]: row["answer"] for row in rows}
    assert len(answers) == 20
    assert "Paris" in answers["What is the capital of France?"]
    assert "Tokyo" in answers["What is the capital of Japan?"]
