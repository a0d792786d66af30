"""A fixed pool of vLLM engine actors, started once per run and shared by every partition.

vLLM takes minutes to start on a GPU (~140 s for a 1B model on an H100: compile + CUDA graphs).
The pool is owned by this resource, not by one Ray Data execution, so a run that materializes many
partitions (a single-run backfill) loads the model once and streams all partitions through it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Optional, TypeVar

import dagster as dg
from pydantic import Field, PrivateAttr

from llm_assets import vllm_compat
from llm_assets.config import vLLMEngineProcessorConfig
from llm_assets.secret_env import split_runtime_env
from llm_assets.stages.base import RowError
from llm_assets.stages.vllm_engine import vLLMEngineStage
from resources.ray_data import RayDataResource, before_ray_shutdown

Tag = TypeVar("Tag")
START_LOG_EVERY_S = 15.0
IN_FLIGHT_PER_SEQUENCE_SLOT = 3


class EngineStartError(RuntimeError):
    pass


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray error (a RowError raised in the actor, say)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class EnginePool:
    """``concurrency`` engine actors and a bounded window of batches in flight on each.

    An engine that dies mid-run (its actor process killed, or vLLM's engine core gone) is replaced
    through ``restart(index)``, at most ``max_restarts`` times per run, and the batches it had in
    flight are sent again: their outputs never came back, so every row still comes out once.
    """

    def __init__(self, actors: list, batches_in_flight: int, restart: Optional[Callable[[int], Any]] = None, max_restarts: int = 0, log: Callable[[str], None] = print):
        self.actors = actors
        self.batches_in_flight = batches_in_flight
        self.restart = restart
        self.restarts_left = max_restarts if restart is not None else 0
        self.log = log

    def map(self, tagged_batches: Iterator[tuple[Tag, Any]]) -> Iterator[tuple[Tag, Any]]:
        """Send (tag, batch) pairs to the least-loaded engine; yield (tag, output) as they finish.

        Completion order, not input order: rows carry their ids. Input is pulled lazily, only
        when an engine has room, so memory stays bounded by the in-flight window.
        """
        import ray

        pending: dict[Any, tuple[Tag, int, Any, Any]] = {}  # ref -> (tag, engine index, batch, actor)
        load = [0] * len(self.actors)
        source = iter(tagged_batches)
        exhausted = False
        while True:
            while not exhausted and min(load) < self.batches_in_flight:
                try:
                    tag, batch = next(source)
                except StopIteration:
                    exhausted = True
                    break
                self._submit(pending, load, tag, batch, load.index(min(load)))
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            tag, index, batch, actor = pending.pop(ready[0])
            load[index] -= 1
            try:
                output = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                inner = _unwrap(exc)
                if isinstance(inner, RowError):
                    raise inner from None
                if not _engine_died(exc, inner):
                    raise
                if self.actors[index] is actor:  # not replaced yet by an earlier failed batch
                    self._replace(index, inner, pending, load)
                self._submit(pending, load, tag, batch, index)
                continue
            yield tag, output

    def _submit(self, pending: dict, load: list[int], tag, batch, index: int) -> None:
        actor = self.actors[index]
        pending[actor.process.remote(batch)] = (tag, index, batch, actor)
        load[index] += 1

    def _replace(self, index: int, cause: BaseException, pending: dict, load: list[int]) -> None:
        import ray

        dead = self.actors[index]
        lost = [(ref, entry) for ref, entry in pending.items() if entry[3] is dead]
        if self.restarts_left <= 0:
            raise EngineStartError(f"vLLM engine {index} died ({_first_line(cause)}) and no restart is left; the run stops, committed partitions stay") from None
        self.restarts_left -= 1
        self.log(
            f"vLLM engine {index} died ({_first_line(cause)}); starting a new one, then resending the "
            f"{len(lost) + 1} batch(es) it had in flight"
        )
        try:
            ray.kill(dead)
        except Exception:  # already gone
            pass
        self.actors[index] = self.restart(index)
        for ref, (tag, _, batch, _) in lost:  # they can only fail now: send them again
            del pending[ref]
            load[index] -= 1
            self._submit(pending, load, tag, batch, index)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception:  # already dead: nothing to shut down
                pass
            ray.kill(actor)
        self.actors = []


def _engine_died(exc: BaseException, inner: BaseException) -> bool:
    """The actor process is gone, or vLLM reports its engine core dead (not a row's problem)."""
    import ray

    return isinstance(exc, ray.exceptions.RayActorError) or type(inner).__name__ == "EngineDeadError"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class EngineHost:
    """One engine actor, started in two steps.

    Created when the run's first stage begins, it imports vLLM and the modules an engine start
    needs (from a cold disk ~28 s on the H100 test machine) while the CPU stages run. :meth:`start` builds the engine (GPU memory, compile, CUDA graphs)
    only once the rows have passed Preprocess's checks, so bad input never reaches a GPU.
    """

    def __init__(self, on_gpu: bool, secret_env: dict[str, str]):
        os.environ.update(secret_env)  # this process is the engine's alone (see secret_env.py)
        started = time.perf_counter()
        vllm_compat.preimport_engine_modules(on_gpu)
        self.import_seconds = time.perf_counter() - started
        self.stage: Optional[vLLMEngineStage] = None

    async def start(self, **stage_kwargs: Any) -> dict[str, Any]:
        self.stage = vLLMEngineStage(**stage_kwargs)
        return {**self.stage.info(), "import_seconds": round(self.import_seconds, 2)}

    async def process(self, batch):
        return await self.stage.process(batch)

    def shutdown(self) -> None:
        if self.stage is not None:
            self.stage.shutdown()


class VLLMEnginePoolResource(dg.ConfigurableResource):
    """Starts the engine actors of a pipeline on first use in a run, and stops them at its end."""

    # A dependency, so that Dagster tears the pool down (engines shut down cleanly) before Ray.
    ray_data: RayDataResource
    num_cpus_per_engine: float = Field(default=1.0, description="Logical CPUs each engine actor reserves.")
    start_timeout_s: float = Field(default=1800.0, description="How long an engine may take to start.")
    max_engine_restarts: int = Field(default=3, ge=0, description="Engines that die mid-run are replaced this many times per run, at most.")
    _pools: dict[str, EnginePool] = PrivateAttr(default_factory=dict)
    _hosts: dict[str, list] = PrivateAttr(default_factory=dict)  # actors created, engine maybe not built
    _starts: dict[str, list] = PrivateAttr(default_factory=dict)  # refs of the engines' start calls

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.shutdown_engines()

    def shutdown_engines(self) -> None:
        """Stop every engine this resource started (idempotent; a no-op once Ray is gone)."""
        import ray

        if ray.is_initialized():
            for pool in self._pools.values():
                pool.shutdown()
            for key, hosts in self._hosts.items():  # never used: the run failed before the engine stage
                if key in self._pools:
                    continue
                if key in self._starts:
                    EnginePool(hosts, 0).shutdown()  # an engine may be built: shut it down cleanly
                else:
                    for host in hosts:  # only imported vLLM so far
                        ray.kill(host)
        self._pools.clear()
        self._hosts.clear()
        self._starts.clear()

    def prepare(self, config: vLLMEngineProcessorConfig, model_source: str, engine_detokenizes: bool, log) -> None:
        """Create the engine actors now (they import vLLM) without building the engines."""
        self._hosts_for(config, model_source, engine_detokenizes, log)

    def prestart(self, config: vLLMEngineProcessorConfig, model_source: str, engine_detokenizes: bool, log) -> None:
        """Begin building the engines without waiting, so they load while CPU stages run."""
        self._start(config, model_source, engine_detokenizes, log)

    def get_pool(
        self,
        config: vLLMEngineProcessorConfig,
        model_source: str,
        engine_detokenizes: bool,
        log: Callable[[str], None],
    ) -> EnginePool:
        """The running pool for this config, started (or awaited) on first use in the run."""
        key = self._key(config, model_source, engine_detokenizes)
        if key in self._pools:
            log(f"Reusing the {len(self._pools[key].actors)} running vLLM engine(s) for {model_source}")
            return self._pools[key]
        hosts, starts = self._start(config, model_source, engine_detokenizes, log)
        infos = self._wait_ready(hosts, starts, model_source, log)
        # Enough batches in flight that the engine's scheduler always has work queued: at least
        # max_concurrent_batches, and 3x the sequences the scheduler runs at once. Rows of equal
        # length finish in waves; with only 1.5x queued, a wave of finished sequences left the
        # scheduler short of waiting requests until the driver's next batches arrived.
        per_batch = max(1, config.batch_size)
        window = max(config.max_concurrent_batches, -(-int(IN_FLIGHT_PER_SEQUENCE_SLOT * infos[0]["max_num_seqs"]) // per_batch))
        log(f"{len(hosts)} vLLM engine(s) ready; up to {window} batches of {per_batch} rows in flight per engine")

        def restart(index: int):
            host, start = self._new_host(config, model_source, engine_detokenizes, log)
            self._wait_ready([host], [start], model_source, log)
            hosts[index] = host  # teardown shuts down the replacement, not the dead one
            return host

        self._pools[key] = EnginePool(hosts, window, restart, self.max_engine_restarts, log)
        return self._pools[key]

    @staticmethod
    def _key(config: vLLMEngineProcessorConfig, model_source: str, engine_detokenizes: bool) -> str:
        return f"{model_source}|{engine_detokenizes}|{config.model_dump_json()}"

    def _on_gpu(self) -> bool:
        self.ray_data.ensure_started()
        return self.ray_data.cluster_gpus() > 0

    def _hosts_for(self, config: vLLMEngineProcessorConfig, model_source: str, engine_detokenizes: bool, log) -> list:
        key = self._key(config, model_source, engine_detokenizes)
        if key not in self._hosts:
            on_gpu = self._on_gpu()
            log(
                f"Loading vLLM into {config.engine_pool_size} engine actor(s) for {model_source} "
                f"({self._gpus_per_engine(config, on_gpu)} GPU(s) each, {'GPU' if on_gpu else 'CPU'} build)"
            )
            before_ray_shutdown(self.shutdown_engines)
            self._hosts[key] = [self._new_actor(config, on_gpu) for _ in range(config.engine_pool_size)]
        return self._hosts[key]

    def _start(self, config: vLLMEngineProcessorConfig, model_source: str, engine_detokenizes: bool, log) -> tuple[list, list]:
        key = self._key(config, model_source, engine_detokenizes)
        hosts = self._hosts_for(config, model_source, engine_detokenizes, log)
        if key not in self._starts:
            log(f"Starting {len(hosts)} vLLM engine actor(s) for {model_source}")
            stage_kwargs = self._stage_kwargs(config, model_source, engine_detokenizes)
            self._starts[key] = [host.start.remote(**stage_kwargs) for host in hosts]
        return hosts, self._starts[key]

    def _new_host(self, config: vLLMEngineProcessorConfig, model_source: str, engine_detokenizes: bool, log) -> tuple[Any, Any]:
        """One more engine actor, started (a replacement for one that died)."""
        on_gpu = self._on_gpu()
        host = self._new_actor(config, on_gpu)
        return host, host.start.remote(**self._stage_kwargs(config, model_source, engine_detokenizes))

    @staticmethod
    def _gpus_per_engine(config: vLLMEngineProcessorConfig, on_gpu: bool) -> int:
        return config.tensor_parallel_size * config.pipeline_parallel_size if on_gpu else 0

    def _new_actor(self, config: vLLMEngineProcessorConfig, on_gpu: bool):
        import ray

        runtime_env, secret_env = split_runtime_env(config.runtime_env)
        runtime_env["env_vars"] = {**vllm_compat.engine_actor_env(on_gpu), **runtime_env.get("env_vars", {})}
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus_per_engine,
            "num_gpus": self._gpus_per_engine(config, on_gpu),
            "runtime_env": runtime_env,
            "max_concurrency": 10_000,  # async actor: many batches in flight
        }
        if config.accelerator_type:
            options["accelerator_type"] = config.accelerator_type
        return ray.remote(EngineHost).options(**options).remote(on_gpu, secret_env)

    def _stage_kwargs(self, config: vLLMEngineProcessorConfig, model_source: str, engine_detokenizes: bool) -> dict[str, Any]:
        return dict(
            model_source=model_source,
            engine_kwargs=vllm_compat.platform_engine_kwargs(config.engine_kwargs, self._on_gpu()),
            task_type=config.task_type,
            max_pending_requests=config.max_pending_requests,
            should_continue_on_error=config.should_continue_on_error,
            engine_detokenizes=engine_detokenizes,
        )

    def _wait_ready(self, actors: list, starts: list, model_source: str, log) -> list[dict[str, Any]]:
        import ray

        started = time.monotonic()
        refs = {ref: i for i, ref in enumerate(starts)}
        infos: list[Optional[dict]] = [None] * len(actors)
        while True:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=START_LOG_EVERY_S)
            for ref in ready:
                index = refs.pop(ref)
                try:
                    infos[index] = ray.get(ref)
                except Exception as exc:
                    for actor in actors:
                        ray.kill(actor)
                    raise EngineStartError(f"vLLM engine {index} for {model_source} failed to start: {_unwrap(exc)}") from None
                info = infos[index]
                log(
                    f"vLLM engine {index} started in {info['start_seconds']} s after importing vLLM in "
                    f"{info['import_seconds']} s (pid {info['pid']} on {info['host']})"
                )
            if not refs:
                return infos  # type: ignore[return-value]
            waited = time.monotonic() - started
            if waited > self.start_timeout_s:
                for actor in actors:
                    ray.kill(actor)
                raise EngineStartError(f"vLLM engines for {model_source} did not start within {self.start_timeout_s:.0f} s")
            log(f"Waiting for {len(refs)} vLLM engine(s) to start ({waited:.0f} s so far)")
