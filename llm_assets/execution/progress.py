"""The run's progress lines: what is committed and what the engines are doing.

Every 10 s while something moves; while nothing does (an engine building for minutes), once a
minute, so the log is not the same line over and over. A run that finishes no batch for
``stall_report_s`` also logs what it waits for (``stall.py``).
"""

from __future__ import annotations

import time
from typing import Callable

from llm_assets.execution.stall import stall_report

PROGRESS_EVERY_S = 10.0
UNCHANGED_PROGRESS_EVERY_S = 60.0


class Progress:
    def __init__(self, name: str, log: Callable[[str], None], stall_report_s: float):
        self.name, self.log, self.stall_report_s = name, log, stall_report_s
        self.last_progress = self.last_settled = self.last_stall_report = self.last_logged = time.monotonic()
        self.last_state: tuple = ()
        self.engine_rows_done = 0

    def settled(self) -> None:
        """A batch finished (a task, a lookup or an engine's batch)."""
        self.last_settled = time.monotonic()

    def report(self, summary: str, pool, queued_rows: int, steps: list) -> None:
        """``summary``: the partitions each stage committed; ``queued_rows``: rows waiting for the engines."""
        self._progress(summary, pool, queued_rows)
        now, every = time.monotonic(), self.stall_report_s
        if every and now - self.last_settled >= every and now - self.last_stall_report >= every:
            self.last_stall_report = now
            self.log(stall_report(self.name, now - self.last_settled, steps, pool, queued_rows))

    def _progress(self, summary: str, pool, queued_rows: int) -> None:
        now = time.monotonic()
        if now - self.last_progress < PROGRESS_EVERY_S:
            return
        self.last_progress = now
        state = (summary, self.engine_rows_done, queued_rows)
        if state == self.last_state and now - self.last_logged < UNCHANGED_PROGRESS_EVERY_S:
            return
        self.last_state, self.last_logged = state, now
        line = f"{self.name}: partitions committed: {summary}"
        if pool is not None and pool.building and not pool.ready:
            line += (
                f"; waiting for {pool.starting()} {pool.engine.label} engine(s) to start "
                f"({now - pool.build_started:.0f} s "
                f"so far), {queued_rows} rows queued for them"
            )
        elif pool is not None and pool.ready:
            rate = self.engine_rows_done / max(now - pool.first_ready, 1e-9)
            line += f"; engine: {self.engine_rows_done} rows done, {rate:.1f} rows/s since it was ready"
        self.log(line)
