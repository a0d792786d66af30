"""Ray for a run, as a Dagster resource: a thin wrapper over ``llm_assets.ray_session.RaySession``."""

from __future__ import annotations

from typing import Any, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from llm_assets.ray_session import RaySession


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
        description="A run that finishes no batch for this long logs what it waits for (engines, tasks, free "
        "resources, object store), and again as long as that lasts; 0: never.",
    )
    log_to_driver: bool = Field(
        default=True,
        description="Print the Ray workers' own output (vLLM's log, say) in the run's process; it stays in Ray's "
        "session logs either way.",
    )
    _session: Optional[RaySession] = PrivateAttr(default=None)

    def session(self) -> RaySession:
        """The run's Ray session; Ray itself starts on first use, not when Dagster builds the
        resource (Dagster also builds resources for bookkeeping after a run ends)."""
        if self._session is None:
            self._session = RaySession(
                self.address, self.num_cpus, self.num_gpus, self.namespace, self.runtime_env, self.log_to_driver
            )
        return self._session

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._session is not None:
            self._session.shutdown()
