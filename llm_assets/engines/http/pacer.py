"""One request rate per endpoint: send times handed out ``1/qps`` apart to every replica of every
run that sends to the same URL from the same machine.

``qps`` is a limit users set for an endpoint, not for a run: two runs (or two pipelines) against
one URL must share it. The schedule (the next free send time) lives in a small file per URL,
updated under a file lock, so runs in different processes, each with a Ray of its own, share it.
The ``RequestPacer`` actor that the replicas ask is placed on the run's own node (the machine
that launched the run), so the replicas of a run on a Ray cluster share that machine's schedule.
Runs launched from different machines do not share a schedule (README limits).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from filelock import FileLock

PACER_DIR_ENV = "LLM_ASSETS_PACER_DIR"


def schedule_path(url: str) -> Path:
    """The file that holds the URL's next free send time (a folder per user, beside Ray's own)."""
    folder = Path(os.environ.get(PACER_DIR_ENV) or Path(tempfile.gettempdir()) / f"llm_assets-pacers-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}.json"


class RequestPacer:
    """A Ray actor, one per run, on the run's node: replicas reserve send times before they send."""

    def __init__(self, url: str, qps: float):
        self.interval = 1.0 / qps
        self.path = schedule_path(url)
        self.lock = FileLock(f"{self.path}.lock")

    def reserve(self, count: int) -> list[float]:
        """Wall-clock times at which ``count`` requests may be sent, each ``1/qps`` after the last
        one reserved for the same URL by any replica of any run on this machine."""
        with self.lock:
            try:
                next_free = float(json.loads(self.path.read_text())["next"])
            except (FileNotFoundError, ValueError, KeyError):  # first use, or a file cut short by a crash
                next_free = 0.0
            start = max(time.time(), next_free)
            self.path.write_text(json.dumps({"next": start + count * self.interval}))
        return [start + i * self.interval for i in range(count)]
