"""Ray for a run: a local Ray by default, or an existing cluster given by ``address``."""

from __future__ import annotations

import os
from typing import Any, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

# Logical CPUs for a local Ray. Actor pools hold their CPUs for their whole life; on a 2-core
# laptop, reserving only the real cores left read/write tasks waiting forever. Logical CPUs are
# bookkeeping, not threads: four of them on two cores is safe.
MIN_LOCAL_CPUS = 4

# Called before a Ray this process started is shut down (engine pools stop their engines cleanly
# first). Dagster's teardown order between resources is not the dependency order we would need.
_before_shutdown: list = []


def before_ray_shutdown(callback) -> None:
    if callback not in _before_shutdown:
        _before_shutdown.append(callback)


class RayDataResource(dg.ConfigurableResource):
    address: Optional[str] = Field(
        default=None,
        description="Ray cluster address ('auto', 'ray://host:10001'); None starts a local Ray for the run.",
    )
    num_cpus: Optional[int] = Field(default=None, description="Logical CPUs of a local Ray (default: max(4, cores)).")
    num_gpus: Optional[int] = Field(default=None, description="GPUs of a local Ray (default: detected).")
    namespace: str = "llm_assets"
    runtime_env: Optional[dict[str, Any]] = None
    stall_report_s: float = Field(
        default=120.0,
        ge=0,
        description="A run that finishes no batch for this long logs what it waits for (engines, tasks, "
        "free resources, object store), and again as long as that lasts; 0: never.",
    )
    _started_here: bool = PrivateAttr(default=False)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        import ray

        if self._started_here and ray.is_initialized():
            while _before_shutdown:
                _before_shutdown.pop(0)()
            ray.shutdown()
            self._started_here = False

    def ensure_started(self, log=None) -> None:
        """Start (or connect to) Ray on first use, not when Dagster builds the resource: Dagster
        also builds resources for bookkeeping after a run ends, and a Ray start costs seconds.
        ``log`` gets one line saying what Ray has (its logical CPUs, which are not the machine's)."""
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "namespace": self.namespace,
                "runtime_env": self.runtime_env,
                "ignore_reinit_error": True,
                "include_dashboard": False,
            }
            if self.address:
                kwargs["address"] = self.address
            else:
                # Without an address, ray.init() joins the last cluster that `ray start` started on
                # this machine (/tmp/ray/ray_current_cluster), where num_cpus is refused: no address
                # means a Ray of the run's own.
                kwargs["address"] = "local"
                kwargs["num_cpus"] = self.num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
                if self.num_gpus is not None:
                    kwargs["num_gpus"] = self.num_gpus
            ray.init(**kwargs)
            self._started_here = True
            if log is not None:
                log(self.describe())

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

    def start(self, log=None) -> float:
        """Start (or connect to) Ray; the cluster's logical CPUs."""
        self.ensure_started(log)
        return self.cluster_cpus()

    def cluster_gpus(self) -> float:
        import ray

        return float(ray.cluster_resources().get("GPU", 0))

    def cluster_cpus(self) -> float:
        import ray

        return float(ray.cluster_resources().get("CPU", 1))
