"""The HTTP replica's default session: new connections to the endpoint opened a few at a time.

A replica sends every row of its batches at once, so without pacing its first batches open up to
aiohttp's 100 connections within a millisecond. A server with a short listen queue (Python's
``http.server`` queues 5) drops the connection requests it cannot queue; the client's kernel sends
them again after 1, 3, 7, 15 and 31 s, all in step, and a connection still not open after
``sock_connect`` (30 s) is a failed attempt. Measured here against such a server that never
failed: 120 rows took 125 s with 6 retries instead of 17 s. Opening at most ``BURST`` connections
at once and then ``NEW_CONNECTIONS_PER_S`` a second costs a server that queues more at most a
second before its 100th connection (LLM answers take longer than that), and requests reuse open
connections (keep-alive) without waiting. A ``session_factory`` of the user's replaces all this.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

NEW_CONNECTIONS_PER_S = 100.0
BURST = 4


class ConnectionGate:
    """A token bucket that every new connection of one session passes before it is opened (a
    replica's session lives on one event loop, so no lock is needed)."""

    def __init__(self, per_s: float = NEW_CONNECTIONS_PER_S, burst: int = BURST):
        self.interval_s, self.burst = 1.0 / per_s, burst
        self.tokens, self.updated = float(burst), time.monotonic()

    async def wait(self, *_trace_args: Any) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) / self.interval_s)
            self.updated = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) * self.interval_s)


def paced_session() -> Any:
    """An ``aiohttp.ClientSession`` whose new connections pass a ``ConnectionGate`` (aiohttp awaits
    its trace hook ``on_connection_create_start`` before it opens each connection)."""
    import aiohttp

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(ConnectionGate().wait)
    return aiohttp.ClientSession(trace_configs=[trace])
