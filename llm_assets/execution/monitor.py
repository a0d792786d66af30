"""What the run's process sees of a Ray Data execution: the ledger's news (failed partitions, the
files of a partition to commit, the engines' states), progress lines, stall reports, the engine
start timeout, and a way to end the execution.

A hook in Ray Data's scheduling loop (an ``ExecutionCallback``, registered on the run's dataset)
keeps the executor at hand, for its operators' state in a stall report, and ends the execution
by raising there once the run asks (an engine that did not start in time, the run interrupted).

Progress lines come every 10 s while something moves; while nothing does (an engine building
for minutes), once a minute. A run that finishes no batch for ``stall_report_s`` also logs what
it waits for: each engine's state, each operator's tasks and queues, the cluster's free CPUs and
GPUs, and how full Ray's object store is.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Callable, Optional

from llm_assets.execution.engine_stage import EngineStartError, first_line
from llm_assets.execution.engines import EngineDiedError, actor_died, settled_death, where_it_died
from llm_assets.private_apis import (
    ray_data_actors,
    ray_data_execution_callback,
    ray_data_operator_states,
    ray_object_store_summary,
)

PROGRESS_EVERY_S = 10.0
ENGINE_OPERATOR = "MapBatches(EngineStage)"  # Ray Data's name of the engine stage's operator
UNCHANGED_PROGRESS_EVERY_S = 60.0
LEDGER_EVERY_S = 1.0
# What an engine start did with its node's compile cache (engines/compile_cache.py), in its log line.
COMPILE_CACHE_NOTES = {
    "compiled": "; compiled its model, kept in {} for the next run",
    "reused": "; loaded its compiled model from {}, compiled by a run before",
}


# The monitors of the executions running in this process, by key: Ray Data's hook finds its run's
# here (the hook itself holds only the key, as it travels with Ray Data's context).
_ATTACHED: dict[str, "Monitor"] = {}


def _on_step(key: str, executor: Any) -> None:
    monitor = _ATTACHED.get(key)
    if monitor is not None:
        monitor.executor = executor
        if monitor.has_engine:
            for handle in ray_data_actors(executor, ENGINE_OPERATOR):
                monitor.engine_actors[handle._actor_id.hex()] = handle
        if monitor.stop_reason is not None:
            raise monitor.stop_reason


class Monitor:
    def __init__(
        self,
        pipeline,
        ledger,
        engines: Optional[tuple[int, str, str]],
        start_timeout_s: float,
        stall_report_s: float,
        log: Callable[[str], None],
    ):
        """``engines``: how many engine actors the run has, what each needs from Ray, and what they
        serve (None: the run has no engine)."""
        self.name, self.label = pipeline.name, pipeline.engine.label
        self.ledger, self.start_timeout_s, self.stall_report_s, self.log = ledger, start_timeout_s, stall_report_s, log
        self.engines, self.has_engine = engines, engines is not None
        self.executor: Any = None
        self.engine_actors: dict[str, Any] = {}  # held until their engines have shut down
        self.stop_reason: Optional[BaseException] = None
        self.key = uuid.uuid4().hex
        self.started = time.monotonic()
        self.failures_seen = 0
        self.last_snapshot: dict[str, Any] = {}
        self.last_ledger = self.last_progress_line = self.last_logged = self.last_stall_report = 0.0
        self.last_state: tuple = ()
        self.first_ready: Optional[float] = None
        self.engine_states: dict[str, tuple] = {}

    # --- Ray Data ---------------------------------------------------------------------------
    def attach(self, dataset) -> None:
        """Register the scheduling-loop hook on the run's dataset."""
        self.started = time.monotonic()
        _ATTACHED[self.key] = self
        context = dataset.context
        # The run reports progress itself (Dagster's log); Ray Data's bars and its periodic
        # progress log would repeat it on stdout. A UDF's own error is raised as it is.
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.enable_auto_log_stats = False
        context.raise_original_map_exception = True
        dataset.context.custom_execution_callback_classes = [
            *dataset.context.custom_execution_callback_classes,
            ray_data_execution_callback(_on_step, self.key),
        ]

    def detach(self) -> None:
        """The execution is over, however it ended: its engine actors are let go (a run that
        failed ends its engines with it) and so is its executor."""
        _ATTACHED.pop(self.key, None)
        self.engine_actors.clear()
        self.executor = None

    def abort(self, reason: Optional[BaseException] = None) -> None:
        """End the execution at Ray Data's next scheduling step."""
        if self.stop_reason is None:
            self.stop_reason = reason or RuntimeError(f"{self.name}: the run was stopped")

    def reason(self, error: Optional[BaseException] = None) -> Optional[BaseException]:
        """Why the execution ended, in the run's words: a start timeout the run imposed, or an
        engine whose actor died with no restart left (Ray Data's error names only an actor id)."""
        if isinstance(self.stop_reason, EngineStartError):
            return self.stop_reason
        died = actor_died(error)
        engines = self.snapshot().get("engines", {}) if died is not None else {}
        if died is None or died.actor_id not in engines:
            return None
        name = f"{self.label} engine {list(engines).index(died.actor_id)}"
        if engines[died.actor_id].get("state") == "failed":  # its build raised: Ray Data does not try again
            return EngineStartError(f"{name} failed to start: {engines[died.actor_id].get('error')}")
        cause = settled_death(died)
        return EngineDiedError(
            f"{name} died ({cause}) "
            f"{where_it_died(engines[died.actor_id])} and no restart is left (EnginePoolResource's "
            "max_engine_restarts): the partitions committed so far stay, and a re-run keeps the rows "
            "the engine wrote"
        )

    # --- the ledger -------------------------------------------------------------------------
    def new_failures(self) -> list[tuple[str, BaseException]]:
        import ray

        failures = ray.get(self.ledger.failures.remote(self.failures_seen))
        self.failures_seen += len(failures)
        return failures

    def complete(self) -> list[tuple[str, str, list[dict]]]:
        """(partition, stage, records) of each stage of a partition now ready to commit."""
        import ray

        return ray.get(self.ledger.complete.remote())

    def deferrals(self) -> list[str]:
        import ray

        return ray.get(self.ledger.deferrals.remote())

    def unfinished(self) -> list[str]:
        import ray

        return ray.get(self.ledger.unfinished.remote())

    def snapshot(self) -> dict[str, Any]:
        import ray

        try:
            self.last_snapshot = ray.get(self.ledger.snapshot.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError) as exc:  # the ledger is gone with Ray: the last one seen
            self.log(f"({self.name}: the run's ledger did not answer: {first_line(exc)})")
        return self.last_snapshot

    # --- reports ----------------------------------------------------------------------------
    def report(self, summary: str) -> None:
        """Called every tick: the start timeout, the progress line, the stall report."""
        now = time.monotonic()
        if now - self.last_ledger < LEDGER_EVERY_S:
            return
        self.last_ledger = now
        snapshot = self.snapshot()
        self._engine_news(snapshot.get("engines", {}))
        ready = snapshot.get("engine_builds", 0)
        if self.has_engine and ready and self.first_ready is None:
            self.first_ready = now
        if self.has_engine and not ready and now - self.started > self.start_timeout_s:
            self.abort(
                EngineStartError(
                    f"{self.label} engines for {self.engines[2]} did not start within {self.start_timeout_s:g} s"
                )
            )
        self._progress(now, summary, snapshot)
        silent = time.time() - snapshot.get("last_progress", time.time())
        every = self.stall_report_s
        if every and silent >= every and now - self.last_stall_report >= every:
            self.last_stall_report = now
            self.log(self._stall_report(silent, snapshot))

    def _engine_news(self, engines: dict[str, dict[str, Any]]) -> None:
        """A line for each engine that became ready, died or failed to start since the last look."""
        for number, (actor, engine) in enumerate(engines.items()):
            news = (engine.get("state"), engine.get("restarts", 0))
            before = self.engine_states.get(actor)
            if before == news:
                continue
            self.engine_states[actor] = news
            name = f"{self.label} engine {number}"
            restarted = news[1] > (before or ("", 0))[1] and (before or ("",))[0] != "dead"
            if restarted:  # Ray restarted its actor: the process had ended (killed, out of memory, node lost)
                self.log(
                    f"{name} died {where_it_died(engine)} with its {engine.get('lost_batches', 0)} batch(es) in "
                    "flight; Ray restarts it and Ray Data sends them again"
                )
            if news[0] == "ready":
                gpus = f", GPU {', '.join(engine['gpu_ids'])}" if engine.get("gpu_ids") else ""
                self.log(
                    f"{name} started in {engine.get('start_seconds')} s after importing {self.label} in "
                    f"{engine.get('import_seconds')} s (pid {engine.get('pid')} on {engine.get('host')}{gpus})"
                    + COMPILE_CACHE_NOTES.get(engine.get("compile_cache"), "").format(engine.get("compile_cache_dir"))
                )
            elif news[0] == "dead":
                self.log(
                    f"{name} died ({engine.get('error')}); Ray restarts its actor and Ray Data sends its batches again"
                )
            elif news[0] == "failed":
                self.log(f"{name} failed to start: {engine.get('error')}")

    def _progress(self, now: float, summary: str, snapshot: dict[str, Any]) -> None:
        if now - self.last_progress_line < PROGRESS_EVERY_S:
            return
        self.last_progress_line = now
        rows = snapshot.get("engine_rows", 0)
        state = (summary, rows)
        if state == self.last_state and now - self.last_logged < UNCHANGED_PROGRESS_EVERY_S:
            return
        self.last_state, self.last_logged = state, now
        line = f"{self.name}: partitions committed: {summary}"
        if self.has_engine and self.first_ready is None:
            waiting = [e.get("state", "not placed") for e in snapshot.get("engines", {}).values()]
            line += f"; waiting for the {self.label} engines to start ({now - self.started:.0f} s so far: "
            line += (", ".join(waiting) or "not placed by Ray yet") + ")"
        elif self.has_engine:
            rate = rows / max(now - self.first_ready, 1e-9)
            line += f"; engine: {rows} rows done, {rate:.1f} rows/s since it was ready"
        self.log(line)

    def _stall_report(self, silent_s: float, snapshot: dict[str, Any]) -> str:
        import ray

        parts = [f"free in the Ray cluster: {_free(ray.available_resources(), ray.cluster_resources())}"]
        engines = snapshot.get("engines", {})
        for number, engine in enumerate(engines.values()):
            parts.append(f"{self.label} engine {number}: {_engine_state(engine)}")
        if self.engines is not None and len(engines) < self.engines[0]:
            unplaced = self.engines[0] - len(engines)
            parts.append(f"{unplaced} {self.label} engine actor(s) not placed by Ray yet: each needs {self.engines[1]}")
        if self.executor is not None:
            parts.extend(ray_data_operator_states(self.executor))
        store = _object_store()
        if store:
            parts.append(store)
        return f"{self.name}: no batch finished for {silent_s:.0f} s; " + "; ".join(parts)

    def log_engine_reports(self, wait_s: float) -> None:
        """Tell the engines the execution is over, wait until each has shut down (its GPU memory
        free: a run that ends leaves its GPUs to the next), and log each one's report."""
        import ray

        self._engine_news(self.snapshot().get("engines", {}))  # a start the last report missed
        ray.get(self.ledger.finish.remote())
        deadline = time.monotonic() + wait_s
        while True:
            engines = self.snapshot().get("engines", {})
            running = [e for e in engines.values() if e.get("state") in ("importing", "building", "ready")]
            if not running or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        self.engine_actors.clear()  # Ray Data has let the actors go: they end now
        for number, engine in enumerate(engines.values()):
            if engine.get("state") == "shut down":
                self.log(f"{self.label} engine {number} shut down: {engine.get('report') or {}}")
            elif engine in running:
                self.log(f"({self.label} engine {number} did not shut down within {wait_s:.0f} s: Ray ends it)")


def _engine_state(engine: dict[str, Any]) -> str:
    state = engine.get("state", "not placed")
    since = time.time() - engine.get("since", time.time())
    if state == "ready":
        return f"ready, {engine.get('rows', 0)} rows done in {engine.get('batches', 0)} batches"
    if state in ("importing", "building"):
        return f"{state} ({since:.0f} s so far, pid {engine.get('pid')})"
    return state + (f": {engine['error']}" if engine.get("error") else "")


def _free(free: dict, total: dict) -> str:
    return (
        ", ".join(f"{free.get(key, 0):g} of {total[key]:g} {key}(s)" for key in ("CPU", "GPU") if total.get(key))
        or "nothing"
    )


def _object_store() -> Optional[str]:
    """Ray's own object store summary (what ``ray memory --stats-only`` prints): no public API gives it."""
    import ray

    try:
        text = ray_object_store_summary(ray.get_runtime_context().gcs_address)
    except Exception as exc:  # a Ray without this private helper: say so instead of the figure
        return f"object store usage unknown ({first_line(exc)})"
    used = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects, ([\d.]+)% full", text)
    spilled = re.search(r"Spilled (\d+) MiB, (\d+) objects", text)
    line = f"Ray's object store {used.group(3)}% full ({used.group(1)} MiB, {used.group(2)} objects)" if used else None
    if spilled:
        line = f"{line or 'Ray object store'}, {spilled.group(1)} MiB spilled to disk"
    return line
