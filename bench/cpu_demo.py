"""The CPU demo as a user runs it, measured: wall time and peak memory summed over every process.

    .venv/bin/python bench/cpu_demo.py [--runs 2] [--systems llm_assets raw_vllm ray_data_llm]

Runs `dagster job execute -f definitions.py -j demo_job` (every stage, the real SmolLM2 on vLLM's
CPU build) with fresh storage and a fresh Dagster home each time, and samples every 0.25 s the
proportional set size (PSS: shared pages split between the processes that map them, so the sum
is what the run really holds) of the command's whole process tree: Dagster, the step process,
Ray's own processes, the engine actor, the task workers. Prints one JSON line per run. The peers
(``bench/cpu_demo_peers.py``: raw vLLM, ray.data.llm) do the same work on the same model and
prompts and are measured the same way; ``--systems`` runs them in turn, one pair after another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

PROJECT = Path(__file__).resolve().parent.parent


def tree_pss(root: psutil.Process) -> dict[str, int]:
    """PSS bytes of ``root`` and each descendant, by a short name of the process."""
    try:
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for process in family:
        try:
            name = " ".join(process.cmdline()[:3])[-60:] or process.name()
            found[f"{process.pid} {name}"] = process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended between listing and reading
            continue
    return found


def demo_command(env: dict) -> list[str]:
    """The demo job as a user runs it (its partition registered first)."""
    subprocess.run(
        [sys.executable, "-m", "llm_assets.cli", "add-partitions", "-f", "definitions.py"],
        cwd=PROJECT,
        env=env,
        check=True,
        capture_output=True,
    )
    dagster = str(Path(sys.executable).parent / "dagster")
    partition = json.dumps({"dagster/partition": "prompts.jsonl"})
    return [dagster, "job", "execute", "-f", "definitions.py", "-j", "demo_job", "--tags", partition]


def run_once(system: str = "llm_assets") -> dict:
    with tempfile.TemporaryDirectory(prefix="llm-assets-demo-") as tmp:
        env = {
            **os.environ,
            "DAGSTER_HOME": f"{tmp}/home",
            "LLM_ASSETS_STORAGE": f"{tmp}/storage",
            "PYTHONPATH": str(PROJECT),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        Path(env["DAGSTER_HOME"]).mkdir()
        if system == "llm_assets":
            argv = demo_command(env)
        else:
            argv = [sys.executable, str(PROJECT / "bench" / "cpu_demo_peers.py"), system]
        started = time.monotonic()
        command = subprocess.Popen(
            argv,
            cwd=PROJECT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        peak: dict = {"pss": 0, "processes": {}}

        def sample() -> None:
            root = psutil.Process(command.pid)
            while command.poll() is None:
                processes = tree_pss(root)
                if sum(processes.values()) > peak["pss"]:
                    peak.update(pss=sum(processes.values()), processes=processes)
                time.sleep(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log, _ = command.communicate()
        wall = time.monotonic() - started
        sampler.join(timeout=5)
        return {
            "system": system,
            "success": command.returncode == 0 and ("RUN_SUCCESS" in log or '"answers": 20' in log),
            "wall_s": round(wall, 1),
            "peak_pss_gib": round(peak["pss"] / 2**30, 2),
            "processes_at_peak": len(peak["processes"]),
            # The largest processes at the peak, MiB: where the memory is.
            "largest_mib": {
                name: round(pss / 2**20) for name, pss in sorted(peak["processes"].items(), key=lambda kv: -kv[1])[:16]
            },
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1)
    systems = ["llm_assets", "raw_vllm", "ray_data_llm"]
    parser.add_argument("--systems", nargs="+", default=["llm_assets"], choices=systems)
    args = parser.parse_args()
    for _ in range(args.runs):
        for system in args.systems:
            print(json.dumps(run_once(system)), flush=True)
