"""An engine of ours (vLLM; SGLang on GPUs) as a Ray Serve application, deployed once and shared.

``ServeEngine`` says what to deploy: an engine config (``vLLMEngineProcessorConfig``, ...), the
app's name, its replicas and idle timeout. ``EngineDeployment`` is the Serve deployment: each of
its replicas builds one engine replica of ours (the same class the engine pool hosts, through the
same ``EngineHost``), once, and serves pyarrow batches to every run that calls it, so pipelines on
it keep their chat template, Tokenize and Detokenize stages and get the columns the engine writes
in its own pool. ``ensure_deployed`` runs in a run's process when its engine pool starts: it
deploys the app, or finds it and checks that it runs the engine asked for.

The app lives as long as its Ray cluster: across runs on a cluster that outlives them
(``RayDataResource(address=...)``), until its keeper (``watchdog.py``) deletes it after
``idle_timeout_s`` without runs or requests; with a Ray the run started, it ends with the run.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field

from llm_assets.config import OfflineProcessorConfig
from llm_assets.engines.serve.watchdog import NAMESPACE, IdleWatchdog, find_watchdog, watchdog_name
from llm_assets.private_apis import ray_started_by_this_process, serve_run_without_blocking

# Batches one Serve replica takes at once (Serve's default is 5): every run's engine clients
# keep their whole window in flight, as they would on an engine actor of their own.
MAX_BATCHES_PER_REPLICA = 1024
# A run's lease on the app from its start until its engine clients attach and renew it.
RUN_LEASE_S = 600.0
# How often a replica tells the keeper it served requests.
ACTIVITY_REPORT_S = 2.0
# An engine that fails to build fails the deployment at once, not after Serve's 20 tries.
CONSTRUCTOR_TRIES = 1
WAIT_FOR_DELETION_S = 120.0

logger = logging.getLogger("ray.serve")


class ServeEngine(BaseModel):
    """A Serve app of one engine, deployed by the first run that needs it and reused by the next."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app_name: str = Field(
        description="The Serve application's name; pipelines sharing the engine name the same ServeEngine."
    )
    engine: OfflineProcessorConfig = Field(
        description="The engine: a vLLMEngineProcessorConfig (or SGLang's, on GPUs)."
    )
    deployment_name: str = "engine"
    num_replicas: int = Field(default=1, ge=1, description="Engine replicas in the app (each its own GPUs).")
    num_cpus_per_replica: float = Field(default=1.0, ge=0)
    idle_timeout_s: Optional[float] = Field(
        default=600.0,
        gt=0,
        description="Delete the app (free its GPUs) after this long "
        "without runs or requests; None: keep it until deleted by hand.",
    )

    def identity(self, on_gpu: bool, engine_detokenizes: bool) -> dict[str, Any]:
        """What makes two deployments the same engine (hashed into the app's digest). The engine
        config's runtime_env is left out: it may hold secrets."""
        from llm_assets import versions
        from llm_assets.engines.base import engine_for

        engine = engine_for(self.engine)
        return {
            "engine": engine.label,
            "library": engine.library_version(),
            "settings": self.engine.model_dump(mode="json", exclude={"runtime_env"}),
            "code": versions.digest({"code": [versions.module_code(name) for name in engine.code_modules]}),
            "on_gpu": on_gpu,
            "engine_detokenizes": engine_detokenizes,
            "num_replicas": self.num_replicas,
            "num_cpus_per_replica": self.num_cpus_per_replica,
        }


class EngineDeployment:
    """One Serve replica: one engine replica of ours, built here once, serving batches."""

    async def __init__(
        self,
        engine,
        replica_kwargs: dict[str, Any],
        on_gpu: bool,
        secret_env: dict[str, str],
        app_name: str,
        num_replicas: int,
    ):
        from llm_assets.engines.host import EngineHost

        self.host = EngineHost(engine, on_gpu, secret_env)
        self.info = await self.host.start(**replica_kwargs)
        # Each replica runs max_num_seqs at once; the runs' clients see the app's total.
        self.info.update(
            built_at=time.time(), max_num_seqs=int(self.info["max_num_seqs"]) * num_replicas, label=engine.label
        )
        logger.info(
            f"built the {engine.label} engine for {replica_kwargs.get('model_source')} "
            f"in {self.info['start_seconds']} s"
        )
        self.keeper = find_watchdog(app_name)
        self.in_flight, self.served_since_report = 0, False
        self._reporter = asyncio.get_running_loop().create_task(self._report_activity())

    async def process(self, batch):
        self.in_flight += 1
        try:
            output, _rows = await self.host.process(batch)
            return output
        finally:
            self.in_flight -= 1
            self.served_since_report = True

    def describe(self) -> dict[str, Any]:
        """Where this replica's engine runs, when it was built, how many requests it runs at once."""
        return self.info

    async def _report_activity(self) -> None:
        while self.keeper is not None:
            await asyncio.sleep(ACTIVITY_REPORT_S)
            if self.in_flight or self.served_since_report:
                self.served_since_report = False
                self.keeper.touch.remote()

    def __del__(self):  # Serve calls it when the replica stops (the app deleted, or scaled down)
        report = self.host.shutdown()
        logger.info(f"engine shut down: {report}")


def app_status(app_name: str) -> Any:
    """Serve's status of the app (``status``, ``message``, ``deployments``), or None."""
    from ray import serve

    return serve.status().applications.get(app_name)


def status_name(status: Any) -> str:
    return getattr(status, "value", str(status))  # Serve's status enums


def ensure_deployed(
    app: ServeEngine, target: str, on_gpu: bool, engine_detokenizes: bool, log: Callable[[str], None]
) -> str:
    """Deploy ``app`` (an engine for the resolved model ``target``) unless it runs already, and
    hold it for this run; returns the run's lease. Idempotent: runs that find the app with the
    same digest reuse it; one asking for another engine under the same name fails, naming both."""
    import ray

    from llm_assets import versions

    identity = app.identity(on_gpu, engine_detokenizes)
    digest = versions.digest(identity)
    lease = uuid.uuid4().hex
    deadline = time.monotonic() + WAIT_FOR_DELETION_S
    while True:
        status, keeper = app_status(app.app_name), find_watchdog(app.app_name)
        if status is not None and keeper is None:
            raise RuntimeError(
                f"Serve app {app.app_name!r} runs on this Ray cluster but was not deployed by llm_assets: "
                "give the ServeEngine another app_name, or call the app with ServeDeploymentProcessorConfig("
                "app_name=..., deployment_name=...) and rows carrying method and request_kwargs"
            )
        if status is None and keeper is not None:
            ray.kill(keeper)  # the keeper of an app deleted by hand: a new app gets a new keeper
            keeper = None
        if keeper is None:
            # get_if_exists: a run deploying at the same moment gets this keeper, and its digest decides.
            keeper = (
                ray.remote(IdleWatchdog)
                .options(
                    name=watchdog_name(app.app_name),
                    namespace=NAMESPACE,
                    lifetime="detached",
                    num_cpus=0,
                    get_if_exists=True,
                )
                .remote(app.app_name, digest, identity, app.idle_timeout_s)
            )
        held = ray.get(keeper.claim.remote(lease, RUN_LEASE_S))
        if not held["deleting"]:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve app {app.app_name!r} was still being deleted after {WAIT_FOR_DELETION_S:.0f} s")
        log(f"Serve app {app.app_name!r} is being deleted after its idle timeout; waiting to deploy it again")
        time.sleep(1.0)
    if held["digest"] != digest:
        raise RuntimeError(
            f"Serve app {app.app_name!r} runs another engine than this pipeline asks for: "
            f"{_differences(held['summary'], identity)}. Delete it (ray.serve.delete({app.app_name!r})) "
            "or give this engine another app_name"
        )
    if status is None:
        _deploy(app, target, on_gpu, engine_detokenizes, log)
    else:
        log(
            f"Serve app {app.app_name!r}: reusing the running {identity['engine']} engine for "
            f"{app.engine.model_source} "
            f"(deployed {time.time() - held['deployed_at']:.0f} s ago, {status_name(status.status)}; deleted after "
            f"{held['idle_timeout_s']} s without runs or requests)"
        )
    return lease


def _deploy(app: ServeEngine, target: str, on_gpu: bool, engine_detokenizes: bool, log: Callable[[str], None]) -> None:
    from ray import serve

    from llm_assets.engines.base import engine_for
    from llm_assets.engines.host import engine_actor_options

    engine = engine_for(app.engine)
    options, secret_env = engine_actor_options(
        engine, app.engine, on_gpu, app.num_cpus_per_replica, engine.gpus_per_replica(on_gpu), app.num_replicas
    )
    # Rows' errors always come back as rows: each run's client decides, by its own config,
    # whether one fails the run (pipelines sharing the engine may differ).
    replica_kwargs = {**engine.replica_kwargs(target, on_gpu, engine_detokenizes), "should_continue_on_error": True}
    deployment = serve.deployment(EngineDeployment).options(
        name=app.deployment_name,
        num_replicas=app.num_replicas,
        ray_actor_options=options,
        max_ongoing_requests=MAX_BATCHES_PER_REPLICA,
        max_constructor_retry_count=CONSTRUCTOR_TRIES,
    )
    # No HTTP proxy where Serve is not running yet: runs call the app through handles only.
    serve.start(proxy_location="Disabled")
    serve_run_without_blocking(
        deployment.bind(engine, replica_kwargs, on_gpu, secret_env, app.app_name, app.num_replicas), app.app_name
    )  # the run goes on; its engine clients wait for the replicas
    lifetime = (
        (
            "this run's process started its Ray, so the app ends with the run (give RayDataResource an address "
            "to keep it across runs)"
        )
        if ray_started_by_this_process()
        else (f"it outlives this run on the Ray cluster, deleted after {app.idle_timeout_s} s without runs or requests")
    )
    log(f"Serve app {app.app_name!r}: deploying {app.num_replicas} {engine.label} replica(s) for {target}; {lifetime}")


def _differences(running: dict[str, Any], asked: dict[str, Any]) -> str:
    keys = sorted(key for key in set(running) | set(asked) if running.get(key) != asked.get(key))
    return (
        "; ".join(f"{key}={running.get(key)!r} where this pipeline asks {asked.get(key)!r}" for key in keys)
        or "(same settings, other code)"
    )
