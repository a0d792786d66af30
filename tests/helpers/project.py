"""A copy of this repository's code location (definitions.py, pyproject.toml with its [tool.dg],
workspace.yaml, pipelines/, resources/) for tests that scaffold YAML pipelines and run `dg` and `dagster` on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent.parent


BIN = Path(sys.executable).parent


def code_location_copy(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("definitions.py", "pyproject.toml", "workspace.yaml"):
        shutil.copy(PROJECT / name, project / name)
    for folder in ("pipelines", "resources"):  # the code location's YAML pipelines and its own resources module
        shutil.copytree(PROJECT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return project


def run(command: list, project: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DAGSTER_HOME": str(project / "dagster_home"),
        "LLM_ASSETS_STORAGE": str(project / "storage"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    Path(env["DAGSTER_HOME"]).mkdir(exist_ok=True)
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def scaffold(project: Path, name: str) -> Path:
    done = run([str(BIN / "dg"), "scaffold", "defs", "llm_assets.LLMPipelineComponent", name], project, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return project / "pipelines" / name


def set_attributes(defs_yaml: Path, **attributes) -> None:
    document = yaml.safe_load(defs_yaml.read_text())
    for key, value in attributes.items():
        if isinstance(value, dict) and isinstance(document["attributes"].get(key), dict):
            document["attributes"][key].update(value)
        else:
            document["attributes"][key] = value
    defs_yaml.write_text(yaml.safe_dump(document, sort_keys=False))
