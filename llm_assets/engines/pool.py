"""A fixed pool of engine replicas, each in a long-lived Ray actor, fed without blocking.

The streaming run (``execution/stream.py``) drives it from its one event loop: ``build()`` starts
the engines, ``submit()`` sends a batch to the least-loaded live replica, ``refs()`` lists what to
wait on, and ``settle()`` takes a finished reference: an engine start, or a batch's output. A
replica that dies (its actor process gone, or the engine reporting itself dead) is rebuilt in the
background while the others keep working; the batches it had in flight come back to the caller to
be sent to any live replica. Nothing here imports Dagster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from llm_assets.engines import placement as placements
from llm_assets.engines.base import Engine
from llm_assets.engines.errors import BatchFailed, EngineStartError, first_line, unwrap
from llm_assets.engines.host import EngineHost, engine_actor_options
from llm_assets.rows import RowError

IN_FLIGHT_PER_SEQUENCE_SLOT = 3


# How long a dead engine's report waits for Ray to say whether its node is lost.
NODE_VERDICT_WAIT_S = 2.0


def _gpus(info: dict[str, Any]) -> str:
    gpu_ids = info.get("gpu_ids")
    return f", GPU {', '.join(gpu_ids)}" if gpu_ids else ""


@dataclass
class Replica:
    index: int
    actor: Any
    placed_ref: Any = None  # resolves once Ray has placed the actor
    imported_ref: Any = None  # resolves once the actor has imported the engine library
    start_ref: Any = None
    start_asked: float = 0.0
    info: Optional[dict[str, Any]] = None
    load_rows: int = 0
    pending: dict = field(default_factory=dict)  # rows ref -> (tag, batch ref, rows, output ref)
    group: Any = None  # the replica's placement group, where it reserves one (engines/placement.py)


class EnginePool:
    def __init__(
        self,
        engine: Engine,
        target: str,
        engine_detokenizes: bool,
        on_gpu: bool,
        num_cpus_per_engine: float,
        max_restarts: int,
        log: Callable[[str], None],
    ):
        self.engine, self.config, self.target, self.on_gpu, self.log = engine, engine.config, target, on_gpu, log
        config = engine.config
        self.num_cpus_per_engine = num_cpus_per_engine
        self.restarts_left = max_restarts
        self.replica_kwargs = engine.replica_kwargs(target, on_gpu, engine_detokenizes)
        # What the replicas connect to, outside the pool (a Serve app).
        self.replica_kwargs.update(engine.provision(target, on_gpu, engine_detokenizes, log))
        self.gpus = engine.gpus_per_replica(on_gpu)
        self.placement = engine.placement(on_gpu)
        if self.placement is not None:
            self.placement = placements.with_accelerator(self.placement, config.accelerator_type)
            placements.check_fits(self.placement, config.engine_pool_size, f"{engine.label} for {target}")
        log(
            f"Loading {engine.label} into {config.engine_pool_size} engine actor(s) for {target} "
            f"({self.gpus:g} GPU(s) each, {'GPU' if on_gpu else 'CPU'} build"
            + (f"; each reserves a placement group of {self.placement.describe()})" if self.placement else ")")
        )
        self.replicas = [self._new_replica(i) for i in range(config.engine_pool_size)]
        self.building = False
        self.build_started = 0.0
        self.first_ready = 0.0  # when the first engine became ready (monotonic)
        self.held_from, self.held_until = (
            time.monotonic(),
            0.0,
        )  # what the actors hold is theirs from their creation to the release
        self.window_rows = 0
        self.engines_started = 0  # engines built, replacements of dead ones included
        self._stopping: Optional[dict] = None  # shutdown refs -> replica, once asked
        # A dead replica's other batches, handed back to be sent again: the run may already hold
        # their (failed) references from the same wait, and settles them as nothing.
        self.abandoned: set = set()

    # --- starting -------------------------------------------------------------------------
    def _new_replica(self, index: int) -> Replica:
        group, placed = placements.reserve(self.placement, self.num_cpus_per_engine) if self.placement else (None, {})
        actor = self._new_actor(placed)
        return Replica(
            index, actor, placed_ref=actor.__ray_ready__.remote(), imported_ref=actor.prepare.remote(), group=group
        )

    def _start(self, replica: Replica) -> None:
        replica.start_ref, replica.start_asked = replica.actor.start.remote(**self.replica_kwargs), time.monotonic()

    def _new_actor(self, placed: dict[str, Any]):
        import ray

        options, secret_env = engine_actor_options(
            self.engine, self.config, self.on_gpu, self.num_cpus_per_engine, self.gpus, self.config.engine_pool_size
        )
        if placed:  # in its placement group's first bundle, which carries the accelerator type
            options.pop("accelerator_type", None)
            options.update(placed)
        return (
            ray.remote(EngineHost)
            .options(**options, max_concurrency=10_000)
            .remote(self.engine, self.on_gpu, secret_env)
        )

    def build(self) -> None:
        """Begin building every engine (idempotent); ``settle`` takes their start results."""
        if self.building:
            return
        self.building, self.build_started = True, time.monotonic()
        self.log(f"Starting {len(self.replicas)} {self.engine.label} engine actor(s) for {self.target}")
        for replica in self.replicas:
            self._start(replica)

    @property
    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.info is not None]

    def starting(self) -> int:
        return sum(r.start_ref is not None for r in self.replicas)

    def _started(self, replica: Replica, info: dict[str, Any]) -> None:
        if replica.group is not None:  # where Ray put the group's bundles, for the log and usage()
            info = {**info, "bundle_nodes": placements.bundle_nodes(replica.group)}
        replica.info, replica.start_ref = info, None
        self.first_ready = self.first_ready or time.monotonic()
        self.engines_started += 1
        self.log(
            f"{self.engine.label} engine {replica.index} started in {info['start_seconds']} s after importing "
            f"{self.engine.label} in {info['import_seconds']} s (pid {info['pid']} on {info['host']}{_gpus(info)}"
            + (
                f"; its placement group's bundles on Ray nodes {info['bundle_nodes']})"
                if "bundle_nodes" in info
                else ")"
            )
        )
        if not self.window_rows:
            # Enough rows in flight that the scheduler always has work queued: 3x the sequences it
            # runs at once (rows of equal length finish in waves), at least max_concurrent_batches.
            batch = self.config.batch_size
            self.window_rows = max(
                getattr(self.config, "max_concurrent_batches", 1) * batch,
                IN_FLIGHT_PER_SEQUENCE_SLOT * int(info["max_num_seqs"]),
            )
        if len(self.ready) == len(self.replicas) and all(r.start_ref is None for r in self.replicas):
            self.log(
                f"{len(self.replicas)} {self.engine.label} engine(s) ready; "
                f"up to {self.window_rows} rows in flight per engine"
            )

    # --- feeding --------------------------------------------------------------------------
    def free_replica(self) -> Optional[Replica]:
        # While other engines still build, a ready one takes only the rows it runs at once: the
        # rows queued by then are left for the engines about to be ready. (With its full window
        # the first of two TP=2 engines, ready 1.4 s before the other, took 3 072 of a run's
        # 4 000 rows and generated for 23 s while the other finished its 928 in 8 s.)
        building = self.starting() > 0
        live = [
            r
            for r in self.ready
            if r.load_rows < (min(self.window_rows, int(r.info["max_num_seqs"])) if building else self.window_rows)
        ]
        return min(live, key=lambda r: r.load_rows) if live else None

    def submit(self, replica: Replica, tag: Any, batch_ref: Any, rows: int) -> None:
        output_ref, rows_ref = replica.actor.process.options(num_returns=2).remote(batch_ref)
        replica.pending[rows_ref] = (tag, batch_ref, rows, output_ref)
        replica.load_rows += rows

    def refs(self) -> list:
        refs = [r.start_ref for r in self.replicas if r.start_ref is not None]
        for replica in self.replicas:
            refs.extend(replica.pending)
        return refs

    def settle(self, ref) -> tuple[list, list]:
        """Take one finished reference: returns (done, lost): ``done`` holds (tag, output ref) of a
        finished batch; ``lost`` holds (tag, batch ref, rows) of batches a dead replica had in
        flight, to send again. Raises BatchFailed for a batch refused because of a row, or
        EngineStartError."""
        import ray

        for replica in self.replicas:
            if replica.start_ref is not None and ref == replica.start_ref:
                try:
                    self._started(replica, ray.get(ref))
                except Exception as exc:
                    raise EngineStartError(
                        f"{self.engine.label} engine {replica.index} for {self.target} failed to start: {unwrap(exc)}"
                    ) from None
                return [], []
            if ref in replica.pending:
                tag, batch_ref, rows, output_ref = replica.pending.pop(ref)
                replica.load_rows -= rows
                try:
                    ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    inner = unwrap(exc)
                    if isinstance(inner, RowError):
                        raise BatchFailed(tag, inner) from None
                    if not self._died(exc, inner):
                        raise
                    return [], [(tag, batch_ref, rows), *self._replace(replica, inner)]
                return [(tag, output_ref)], []
        if ref in self.abandoned:
            self.abandoned.discard(ref)
            return [], []
        raise KeyError(f"not a reference of this engine pool: {ref}")

    def _died(self, exc: BaseException, inner: BaseException) -> bool:
        import ray

        return isinstance(exc, ray.exceptions.RayActorError) or type(inner).__name__ == "EngineDeadError"

    def _replace(self, replica: Replica, cause: BaseException) -> list:
        """Rebuild a dead replica in the background; returns its other in-flight batches."""
        lost = [(tag, batch_ref, rows) for tag, batch_ref, rows, _ in replica.pending.values()]
        self.abandoned.update(replica.pending)
        where = self._where(replica)
        if self.restarts_left <= 0:
            raise EngineStartError(
                f"{self.engine.label} engine {replica.index} died ({first_line(cause)}){where} and no restart "
                "is left; the run stops, committed partitions stay"
            ) from None
        self.restarts_left -= 1
        self.log(
            f"{self.engine.label} engine {replica.index} died ({first_line(cause)}){where}; building a new one in the "
            f"background, its {len(lost) + 1} batch(es) in flight go to the live engines"
        )
        self._end(replica)
        self.replicas[self.replicas.index(replica)] = replica = self._new_replica(replica.index)
        self._start(replica)
        return lost

    def _end(self, replica: Replica) -> None:
        """End a replica's actor and free its placement group (once: the group is forgotten)."""
        import ray

        try:
            ray.kill(replica.actor)
        except ValueError as exc:  # not an actor handle any more: nothing to kill
            self.log(f"(could not kill the engine actor: {exc})")
        if replica.group is not None:
            placements.release(replica.group, self.log)
            replica.group = None

    def _where(self, replica: Replica) -> str:
        """Where a dead replica ran, and whether Ray has lost that node: Ray's own error says only
        that the actor died, and on a cluster a lost node (a preempted or failed machine) is what
        the operator has to know."""
        import ray

        node = (replica.info or {}).get("node_id")
        if not node:  # died before it was built: Ray never told us where
            return ""
        # The actor's error can arrive before Ray's health check has declared its node dead: ask
        # again for a moment before saying the node is still there.
        deadline = time.monotonic() + NODE_VERDICT_WAIT_S
        while (
            alive := {n["NodeID"]: n["Alive"] for n in ray.nodes()}.get(node)
        ) is not False and time.monotonic() < deadline:
            time.sleep(0.25)
        state = "lost by the Ray cluster" if alive is False else "still in the Ray cluster"
        return f" on Ray node {node} (host {replica.info.get('host')}, {state})"

    def states(self) -> list[str]:
        """What each replica is doing, for a run that reports why it makes no progress."""
        import ray

        def done(ref) -> bool:
            return ref is None or bool(ray.wait([ref], timeout=0, fetch_local=False)[0])

        now, lines = time.monotonic(), []
        for replica in self.replicas:
            name = f"{self.engine.label} engine {replica.index}"
            if replica.info is not None:
                lines.append(
                    f"{name}: {replica.load_rows} rows in flight" if replica.pending else f"{name}: ready, idle"
                )
            elif not done(replica.placed_ref):
                if self.placement is not None:
                    needs = f"a placement group of {self.placement.describe()}"
                else:
                    needs = ", ".join(
                        f"{n:g} {key}" for key, n in (("CPU", self.num_cpus_per_engine), ("GPU", self.gpus)) if n
                    )
                lines.append(f"{name} is not placed by Ray yet: it needs {needs or 'no resources'}")
            elif not done(replica.imported_ref):
                lines.append(f"{name} is importing {self.engine.label}")
            elif replica.start_ref is not None:
                lines.append(f"{name} is building ({now - replica.start_asked:.0f} s so far)")
            else:
                lines.append(f"{name} is ready to build once a batch has passed Preprocess")
        return lines

    def check_start_timeout(self, timeout_s: float) -> None:
        if self.building and not self.ready and time.monotonic() - self.build_started > timeout_s:
            raise EngineStartError(
                f"{self.engine.label} engines for {self.target} did not start within {timeout_s:.0f} s"
            )

    def usage(self) -> dict[str, Any]:
        """What the run's engines held, from the actors' creation to their release: engine-seconds
        (one per replica per second) and GPU-seconds; how many engines were built (replacements of
        dead ones included); and where each engine that started ran."""
        held = (self.held_until or time.monotonic()) - self.held_from
        engines = self.config.engine_pool_size
        placement = [
            {
                "engine": r.index,
                "host": r.info.get("host"),
                "node_id": r.info.get("node_id"),
                "gpu_ids": r.info.get("gpu_ids", []),
                **({"bundle_nodes": r.info["bundle_nodes"]} if "bundle_nodes" in r.info else {}),
            }
            for r in self.replicas
            if r.info is not None
        ]
        return {
            "engine_seconds": round(engines * held, 1),
            "gpu_seconds": round(engines * self.gpus * held, 1),
            "engine_starts": self.engines_started,
            "placement": placement,
        }

    @property
    def shutting_down(self) -> bool:
        return self._stopping is not None

    def begin_shutdown(self) -> None:
        """Ask every built engine to shut down and return at once (idempotent; vLLM waits seconds
        for its engine-core process). An actor with no engine yet ends now: a run failed on bad
        input used to wait up to ``shutdown``'s timeout for a vLLM import nobody needed."""
        if self._stopping is None:
            self.held_until = time.monotonic()
            unbuilt = [replica for replica in self.replicas if replica.info is None]
            for replica in unbuilt:
                self._end(replica)
            if unbuilt:
                self.log(f"Ended {len(unbuilt)} {self.engine.label} engine actor(s) before their engine was built")
            self._stopping = {
                replica.actor.shutdown.remote(): replica for replica in self.replicas if replica.info is not None
            }

    def shutdown(self, timeout_s: float = 15.0) -> None:
        """Shut down (begun by ``begin_shutdown`` or now), wait up to ``timeout_s`` for all the
        engines together, log their reports, then end their actors (what an engine holds is freed
        with its process anyway)."""
        import ray

        self.begin_shutdown()
        pending, self._stopping = self._stopping, {}
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s) if pending else ([], [])
        for ref in done:
            try:
                report = ray.get(ref)
                if report:
                    self.log(f"{self.engine.label} engine {pending[ref].index} shut down: {report}")
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:  # already dead, or never built
                self.log(
                    f"({self.engine.label} engine {pending[ref].index} did not shut down cleanly: {first_line(exc)})"
                )
        for ref in late:
            self.log(
                f"({self.engine.label} engine {pending[ref].index} did not shut down within {timeout_s:.0f} s; "
                "ending it)"
            )
        for replica in self.replicas:
            self._end(replica)
        self.replicas = []
