"""Samples GPU utilization (nvidia-smi) and host memory in the background while a system runs."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


class Monitor:
    def __init__(self, every_s: float = 0.25):
        self.every_s = every_s
        self.samples: list[tuple[float, float, float]] = []  # (time, gpu util %, host used GiB)
        self.baseline_gib = psutil.virtual_memory().used / 2**30
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

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
            self.samples.append((time.time(), util, psutil.virtual_memory().used / 2**30))
            self._stop.wait(self.every_s)

    def gpu_busy_fraction(self, start: float, end: float) -> float:
        window = [u for t, u, _ in self.samples if start <= t <= end and u == u]
        return round(sum(1 for u in window if u > 0) / len(window), 3) if window else float("nan")

    def mean_gpu_util(self, start: float, end: float) -> float:
        window = [u for t, u, _ in self.samples if start <= t <= end and u == u]
        return round(sum(window) / len(window), 1) if window else float("nan")

    def host_peak_gib(self) -> float:
        return round(max((m for _, _, m in self.samples), default=0) - self.baseline_gib, 2)
