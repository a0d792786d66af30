"""Ray for a run: a local Ray by default, or an existing cluster given by ``address``.

A plain class (``llm_assets.resources.RayDataResource`` is its Dagster resource): it starts or
connects to Ray on first use, says what Ray has, and shuts down a Ray it started, after whatever
must stop first (the engine pools) has stopped.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

# Logical CPUs for a local Ray. Actor pools hold their CPUs for their whole life; on a 2-core
# laptop, reserving only the real cores left read/write tasks waiting forever. Logical CPUs are
# bookkeeping, not threads: four of them on two cores is safe.
MIN_LOCAL_CPUS = 4

# Called before a Ray this process started is shut down (the engine pools stop their engines
# cleanly first). One list for the process, as Ray is one per process: Dagster may hand the run's
# resources separate instances of the Ray resource, and the one that started Ray shuts it down.
_BEFORE_SHUTDOWN: list[Callable[[], None]] = []


class RaySession:
    def __init__(
        self,
        address: Optional[str] = None,
        num_cpus: Optional[int] = None,
        num_gpus: Optional[int] = None,
        namespace: str = "llm_assets",
        runtime_env: Optional[dict[str, Any]] = None,
        log_to_driver: bool = True,
    ):
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.namespace, self.runtime_env, self.log_to_driver = namespace, runtime_env, log_to_driver
        self.started_here = False

    @staticmethod
    def before_shutdown(callback: Callable[[], None]) -> None:
        if callback not in _BEFORE_SHUTDOWN:
            _BEFORE_SHUTDOWN.append(callback)

    def ensure_started(self, log: Optional[Callable[[str], None]] = None) -> None:
        """Start (or connect to) Ray on first use; ``log`` gets one line saying what Ray has (its
        logical CPUs, which are not the machine's)."""
        import ray

        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {
            "namespace": self.namespace,
            "runtime_env": self.runtime_env,
            "ignore_reinit_error": True,
            "include_dashboard": False,
            "log_to_driver": self.log_to_driver,
        }
        if self.address:
            kwargs["address"] = self.address
        else:
            # Without an address, ray.init() joins the last cluster that `ray start` started on
            # this machine (/tmp/ray/ray_current_cluster), where num_cpus is refused: no address
            # means a Ray of the run's own.
            kwargs["address"] = "local"
            kwargs["num_cpus"] = self.num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
            # Ray starts one idle worker per logical CPU when its first driver connects, and keeps
            # them (up to that many idle workers are kept): 16 of 0.1-0.3 GiB each on a 16-core GPU
            # node, starting while the engine actor imports vLLM. The run's actors each start
            # their own worker anyway; its tasks get workers as they need them.
            kwargs["_system_config"] = {"prestart_worker_first_driver": False}
            if self.num_gpus is not None:
                kwargs["num_gpus"] = self.num_gpus
        ray.init(**kwargs)
        self.started_here = True
        if log is not None:
            log(self.describe())

    def start(self, log: Optional[Callable[[str], None]] = None) -> float:
        """Start (or connect to) Ray; the cluster's logical CPUs."""
        self.ensure_started(log)
        return self.cluster_cpus()

    def describe(self) -> str:
        """What the run's Ray has, in numbers a user can check."""
        cpus, gpus = self.cluster_cpus(), self.cluster_gpus()
        if self.address:
            return f"Connected to the Ray cluster at {self.address}: {cpus:g} logical CPU(s), {gpus:g} GPU(s) in all"
        how = (
            "RayDataResource(num_cpus=...)"
            if self.num_cpus
            else f"max({MIN_LOCAL_CPUS}, cores) on this {os.cpu_count()}-core machine; "
            "RayDataResource(num_cpus=...) sets another number"
        )
        return f"Started a local Ray for this run: {cpus:g} logical CPU(s) ({how}), {gpus:g} GPU(s)"

    def cluster_gpus(self) -> float:
        import ray

        return float(ray.cluster_resources().get("GPU", 0))

    def cluster_cpus(self) -> float:
        import ray

        return float(ray.cluster_resources().get("CPU", 1))

    def shutdown(self) -> None:
        """Shut down a Ray this session started (what must stop first, first); a no-op otherwise."""
        import ray

        if self.started_here and ray.is_initialized():
            while _BEFORE_SHUTDOWN:
                _BEFORE_SHUTDOWN.pop(0)()
            ray.shutdown()
        self.started_here = False
