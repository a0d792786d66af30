"""Where the host's CPU goes while the engine generates (``PROFILE=1``): each process's and its
busiest threads' CPU over a window, then py-spy's samples of the busiest Python processes.

The step time of a small model's engine is bound by the engine core's CPU (launching kernels,
scheduling, building inputs), so what else runs beside the core on the host, and where the core
itself spends its time, is what separates two systems generating the same steps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil


def cpu_by_process(window_s: float = 10.0, top: int = 12, threads: int = 4) -> list[dict]:
    """Processes by CPU used over ``window_s`` (100 = one core), each with its busiest threads."""

    def snapshot() -> dict[int, tuple[str, float, dict[int, float]]]:
        taken = {}
        for process in psutil.process_iter(["pid", "cmdline", "name"]):
            try:
                times = process.cpu_times()
                per_thread = {t.id: t.user_time + t.system_time for t in process.threads()}
                nice = process.nice()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # gone between listing and reading, or not ours to read
            name = " ".join(process.info["cmdline"] or [])[:80] or process.info["name"]
            taken[process.info["pid"]] = (f"{name} (nice {nice})", times.user + times.system, per_thread)
        return taken

    before = snapshot()
    time.sleep(window_s)
    after = snapshot()
    rows = []
    for pid, (name, total, per_thread) in after.items():
        if pid not in before:
            continue
        used = 100 * (total - before[pid][1]) / window_s
        busiest = sorted(
            ((tid, 100 * (t - before[pid][2].get(tid, 0.0)) / window_s) for tid, t in per_thread.items()),
            key=lambda item: -item[1],
        )[:threads]
        rows.append(
            {
                "pid": pid,
                "process": name,
                "cpu_pct": round(used, 1),
                "threads": [{"name": thread_name(pid, tid), "cpu_pct": round(pct, 1)} for tid, pct in busiest],
            }
        )
    return sorted(rows, key=lambda row: -row["cpu_pct"])[:top]


def thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return str(tid)


def is_python(pid: int) -> bool:
    """By its executable: vLLM's core and Ray's workers rename themselves (``VLLM::EngineCore``, ``ray::``)."""
    try:
        return "python" in Path(psutil.Process(pid).exe()).name
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def py_spy(processes: list[dict], out_dir: Path, duration_s: int = 20) -> list[str]:
    """py-spy's collapsed stacks of the busiest Python processes, recorded at once; the files written."""
    if shutil.which("py-spy") is None:
        return ["py-spy is not installed: no stacks recorded"]
    out_dir.mkdir(parents=True, exist_ok=True)
    recorders = []
    for row in processes:
        path = out_dir / f"{row['pid']}.txt"
        command = ["py-spy", "record", "--pid", str(row["pid"]), "--duration", str(duration_s), "--rate", "200"]
        command += ["--format", "raw", "--output", str(path), "--nonblocking", "--threads"]
        recorders.append((path, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    written = []
    for path, recorder in recorders:
        _, err = recorder.communicate(timeout=duration_s + 60)
        written.append(str(path) if path.exists() else f"{path.name}: {err.decode()[-300:]}")
    return written


def profile_generation(out_dir: Path) -> dict:
    """The CPU picture of a generating host, and py-spy's stacks of its three busiest Python processes."""
    by_process = cpu_by_process()
    python = [row for row in by_process if is_python(row["pid"])]
    return {"cpu_by_process": by_process, "py_spy": py_spy(python[:3], out_dir)}


def summarize(path: Path, top: int = 15) -> str:
    """A py-spy file read back: samples per thread, then the busiest thread's functions by own
    samples and by samples under them (its share of the thread)."""
    by_thread: Counter = Counter()
    own: dict[str, Counter] = {}
    under: dict[str, Counter] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        by_thread[thread] += int(count)
        if frames:
            own.setdefault(thread, Counter())[frames[-1]] += int(count)
            for frame in set(frames):
                under.setdefault(thread, Counter())[frame] += int(count)
    lines = [f"{path.name}: " + ", ".join(f"{thread} {n}" for thread, n in by_thread.most_common(5))]
    for thread, total in by_thread.most_common(2):
        lines.append(f"  {thread}, own samples:")
        lines += [f"    {100 * n / total:5.1f}% {frame}" for frame, n in own.get(thread, Counter()).most_common(top)]
        lines.append(f"  {thread}, under:")
        # Frames under nearly every sample (the thread's entry, the step loop) say nothing: left out.
        telling = [(frame, n) for frame, n in under.get(thread, Counter()).most_common() if n < 0.97 * total]
        lines += [f"    {100 * n / total:5.1f}% {frame}" for frame, n in telling[: 2 * top]]
    return "\n".join(lines)


def cpu_table(result: dict) -> str:
    """A result's CPU picture (``host_profile`` in OUT/SYSTEM.json), one line per process."""
    rows = (result.get("host_profile") or {}).get("cpu_by_process", [])
    return "\n".join(
        f"{row['cpu_pct']:6.1f}% {row['pid']} {row['process'].strip()[:70]} | "
        + ", ".join(f"{t['name']} {t['cpu_pct']}" for t in row["threads"])
        for row in rows
    )


if __name__ == "__main__":  # python bench/host_profile.py OUT/SYSTEM.json OUT/SYSTEM.profile/*.txt
    for name in sys.argv[1:]:
        path = Path(name)
        print(cpu_table(json.loads(path.read_text())) if path.suffix == ".json" else summarize(path))
