"""The keeper of a Serve app that llm_assets deployed: one detached actor per app.

It records what the app runs (the digest of the engine config it was deployed with, so that a
later run asking for another engine under the same name fails instead of silently using it), and
it is the app's idle timer: the app is deleted once, for ``idle_timeout_s``, no run has held it
and no replica has served a request. A detached actor, because the timer must run when no Dagster
run is alive; it ends itself after the deletion.

A run holds the app with a lease (``claim`` when the run starts, ``renew`` by its engine clients
while they are attached, ``release`` when they shut down), so the app is not deleted between the
run's start and its first request. A lease not renewed expires: a run that died does not keep the
app forever.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

NAMESPACE = "llm_assets_serve"
CHECK_EVERY_S = 1.0


def watchdog_name(app_name: str) -> str:
    return f"serve-app-keeper:{app_name}"


def find_watchdog(app_name: str) -> Any:
    """The app's keeper actor, or None."""
    import ray

    try:
        return ray.get_actor(watchdog_name(app_name), namespace=NAMESPACE)
    except ValueError:  # no actor of that name: the app was not deployed by llm_assets, or is gone
        return None


class IdleWatchdog:
    async def __init__(self, app_name: str, digest: str, summary: dict[str, Any], idle_timeout_s: Optional[float]):
        self.app_name, self.digest, self.summary, self.idle_timeout_s = app_name, digest, summary, idle_timeout_s
        self.deployed_at = time.time()
        self.last_active = time.monotonic()
        self.leases: dict[str, float] = {}  # lease id -> when it expires (monotonic)
        self.deleting = False
        if idle_timeout_s is not None:
            # A task of this actor's own loop: it runs whoever called, and after they are gone.
            self._timer = asyncio.get_running_loop().create_task(self._delete_when_idle())

    def claim(self, lease: str, hold_s: float) -> dict[str, Any]:
        """A run attaches: what the app runs, and a lease of ``hold_s`` (nothing once deleting)."""
        if self.deleting:
            return {"deleting": True}
        self.leases[lease] = time.monotonic() + hold_s
        return {
            "deleting": False,
            "digest": self.digest,
            "summary": self.summary,
            "deployed_at": self.deployed_at,
            "idle_timeout_s": self.idle_timeout_s,
        }

    def renew(self, lease: str, hold_s: float) -> bool:
        if not self.deleting:
            self.leases[lease] = time.monotonic() + hold_s
        return not self.deleting

    def release(self, lease: str) -> None:
        if self.leases.pop(lease, None) is not None:
            self.last_active = time.monotonic()  # the idle time counts from the run's end

    def touch(self) -> None:
        """A replica served requests."""
        self.last_active = time.monotonic()

    def idle_seconds(self) -> float:
        now = time.monotonic()
        self.leases = {lease: until for lease, until in self.leases.items() if until > now}
        return 0.0 if self.leases else now - self.last_active

    async def _delete_when_idle(self) -> None:
        import ray
        from ray import serve

        while self.idle_seconds() < self.idle_timeout_s:
            await asyncio.sleep(min(CHECK_EVERY_S, self.idle_timeout_s / 4))
        self.deleting = True
        # Blocks until the replicas are gone, their GPUs free; in a thread, so that claims made
        # meanwhile are answered ("deleting": the run then waits and deploys anew).
        await asyncio.to_thread(serve.delete, self.app_name)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)  # this keeper's work is done
