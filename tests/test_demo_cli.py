"""The README's demo, as a user runs it: `bash scripts/demo.sh`, the real SmolLM2."""

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent.parent


def test_the_demo_script_runs_the_demo_and_prints_progress_and_answers(tmp_path):
    """`bash scripts/demo.sh` (the README's first command; its setup is done already): one run on
    SmolLM2, whose output is the run's progress lines and the answers, not Dagster's DEBUG events
    or vLLM's own log."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "LLM_ASSETS_STORAGE": str(tmp_path / "storage"),
    }
    run = subprocess.run(["bash", "scripts/demo.sh"], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "demo: 1 new partition(s) ['prompts.jsonl']" in log
    assert " DEBUG " not in log and "EngineHost pid=" not in log, log[-4000:]
    assert "postprocess [prompts.jsonl]: committed 20 rows" in log
    assert (
        "What is the capital of France?\n    -> " in log and "Paris" in log.split("What is the capital of France?")[-1]
    )
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) < 80, f"{len(lines)} lines"
    folder = tmp_path / "storage" / "demo" / "postprocess" / "prompts.jsonl"
    manifest = json.loads((folder / "_manifest.json").read_text())
    rows = pq.read_table([str(folder / name) for name in manifest["files"]]).to_pylist()
    answers = {row["question"]: row["answer"] for row in rows}
    assert len(answers) == 20
    assert "Paris" in answers["What is the capital of France?"]
    assert "Tokyo" in answers["What is the capital of Japan?"]
