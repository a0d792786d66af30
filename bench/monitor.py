"""Samples GPU utilization (nvidia-smi) and host memory in the background while a system runs,
and which processes held the memory when its use was highest."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psutil
from host_profile import profile_generation


class Monitor:
    """With ``profile_dir``, also profiles the host once the GPU has been busy for 30 s on average (host_profile.py);
    ``PROFILE_AT_S`` profiles that many seconds after the start instead (a run on CPU)."""

    def __init__(self, every_s: float = 0.25, profile_dir: Path | None = None):
        self.every_s = every_s
        self.samples: list[tuple[float, float, float]] = []  # (time, gpu util %, host used GiB)
        self.baseline_gib = psutil.virtual_memory().used / 2**30
        self.peak_processes: list[tuple[str, float]] = []  # (process, RSS GiB) at the highest use seen
        self._peak_used, self._peak_taken_at = 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.profile_dir, self.profile, self._profiler = profile_dir, None, None
        self._started = time.time()

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._profiler is not None:
            self._profiler.join()

    def _profile_due(self) -> bool:
        if self.profile_dir is None or self._profiler is not None:
            return False
        if "PROFILE_AT_S" in os.environ:
            return time.time() - self._started >= float(os.environ["PROFILE_AT_S"])
        # Generating: the GPU busy on average over the last 30 s (prefill and decode steps make
        # single samples swing; the engine start's graph capture is shorter than that).
        recent = [u for t, u, _ in self.samples if t >= time.time() - 30 and u == u]
        return time.time() - self._started > 30 and len(recent) > 20 and sum(recent) / len(recent) >= 20

    def _start_profile(self) -> None:
        def run() -> None:
            self.profile = profile_generation(self.profile_dir)

        self._profiler = threading.Thread(target=run, daemon=True)
        self._profiler.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                per_gpu = [float(value) for value in out.split()]
                util = sum(per_gpu) / len(per_gpu)  # the mean over the machine's GPUs
            except Exception:
                util = float("nan")
            used = psutil.virtual_memory().used / 2**30
            self.samples.append((time.time(), util, used))
            # A new high, and at most every 2 s (listing the processes takes tens of ms).
            if used > self._peak_used and time.time() - self._peak_taken_at > 2:
                self._peak_used, self._peak_taken_at = used, time.time()
                self.peak_processes = processes_by_memory()
            if self._profile_due():
                self._start_profile()
            self._stop.wait(self.every_s)

    def gpu_busy_fraction(self, start: float, end: float) -> float:
        window = [u for t, u, _ in self.samples if start <= t <= end and u == u]
        return round(sum(1 for u in window if u > 0) / len(window), 3) if window else float("nan")

    def mean_gpu_util(self, start: float, end: float) -> float:
        window = [u for t, u, _ in self.samples if start <= t <= end and u == u]
        return round(sum(window) / len(window), 1) if window else float("nan")

    def host_peak_gib(self) -> float:
        return round(max((m for _, _, m in self.samples), default=0) - self.baseline_gib, 2)


def processes_by_memory(top: int = 15) -> list[tuple[str, float]]:
    """The largest processes by resident memory (GiB), named as ``ps`` shows them (a Ray worker by
    its task or actor)."""
    rows = []
    for process in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        info = process.info
        if info["memory_info"] is None or info["memory_info"].rss < 2**26:  # kernel threads, helpers under 64 MiB
            continue
        name = " ".join(info["cmdline"] or [])[:90] or str(info["pid"])
        rows.append((f"{info['pid']} {name}", round(info["memory_info"].rss / 2**30, 2)))
    return sorted(rows, key=lambda row: -row[1])[:top]
