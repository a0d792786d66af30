"""One request rate for every replica of a run: send times handed out ``1/qps`` apart."""

from __future__ import annotations

import time


class RequestPacer:
    """A Ray actor, one per engine pool (so per run): replicas reserve send times before they send."""

    def __init__(self, qps: float):
        self.interval = 1.0 / qps
        self._next = 0.0

    def reserve(self, count: int) -> list[float]:
        """Wall-clock times at which ``count`` requests may be sent, each ``1/qps`` after the last
        one reserved by any replica."""
        start = max(time.time(), self._next)
        self._next = start + count * self.interval
        return [start + i * self.interval for i in range(count)]
