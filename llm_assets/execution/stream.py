"""The one-step streaming run: the selected stages of a pipeline, over the run's partitions, as one
stream through Ray, driven by one event loop in the run's process.

Units (batches of one partition) flow through the steps of the chain (``execution/steps.py``):
CPU task groups and the engine pool. The engine actors import the engine library from the run's
start; the engine build begins as soon as the first unit has passed Preprocess (bad input found
there never reaches a GPU; a model without a chat template is refused before the run starts); the
engine takes units as soon as they are tokenized, whatever their partition; the stages after it
follow unit by unit. Every stage commits each partition (manifest last) as soon as all its units
are written; the run reports each commit as it happens, and each stage when all its partitions are
committed.
How far ahead of the engine the CPU stages may read is bounded, so host memory stays flat in
partition size and count. Engines are released as soon as the engine stage has committed.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

from llm_assets.engines.pool import BatchFailed, first_line, unwrap
from llm_assets.errors import SourceError
from llm_assets.execution.cache import RunCache
from llm_assets.execution.calls import StageCalls
from llm_assets.execution.commits import Commits
from llm_assets.execution.events import Event, PartitionCommitted, PartitionsFailed, StageDone
from llm_assets.execution.inputs import Entry, Unit, plan_entry, units
from llm_assets.execution.preflight import check_sources
from llm_assets.execution.progress import Progress
from llm_assets.execution.steps import build_steps, chains, check_schedulable, step_of
from llm_assets.execution.units import run_unit
from llm_assets.execution.warmup import Warmup
from llm_assets.rows import RowError
from llm_assets.tasks import ENGINE

Log = Callable[[str], None]
# Rows read ahead of the engine at least; more while no engine is ready yet: the engine build takes
# tens of seconds on a GPU, with the CPU stages otherwise idle, so a job of a few ten thousand short
# rows is tokenized by the time it is ready (docs/benchmarks.md, sitting 14).
LOOKAHEAD_MIN_ROWS = 8192
LOOKAHEAD_STARTING_ROWS = 32768
PLANNING_THREADS = 16
# What a run's engines held when none was started (the response cache answered every row).
NO_ENGINE_USAGE = {"engine_seconds": 0.0, "gpu_seconds": 0.0, "engine_starts": 0, "placement": []}


class StreamingRun:
    def __init__(
        self,
        pipeline,
        selected: list[str],
        partitions: list[str],
        storage,
        engines,
        start_ray: Callable[[], float],
        log: Log = print,
        recompute: bool = False,
        stall_report_s: float = 120.0,
    ):
        """``start_ray`` starts (or connects to) Ray and returns the cluster's CPUs: the run calls
        it while its partitions are being planned, since a Ray start takes seconds."""
        self.pipeline, self.partitions, self.storage, self.engines, self.log = (
            pipeline,
            partitions,
            storage,
            engines,
            log,
        )
        self.recompute, self.stall_report_s = recompute, stall_report_s
        self.start_ray = start_ray
        self.chains = chains(pipeline, selected)
        self.session = uuid.uuid4().hex[:8]
        self.copies: Optional[str] = None  # where the run keeps its S3 input objects, downloaded once

    def run(self) -> Iterator[Event]:
        """Yields each partition of a stage as it is committed, each stage once all its partitions
        are (or failed), and None now and then (the stream does not wait for the caller: keep the
        work done on each yield short). Raises PartitionsFailed, after the rest is committed,
        when some partitions failed."""
        with tempfile.TemporaryDirectory(prefix="llm-assets-inputs-") as copies:
            self.copies = copies
            for chain in self.chains:
                yield from _ChainRun(self, chain).run()


class _ChainRun:
    def __init__(self, run: StreamingRun, chain: list[str]):
        self.run_, self.chain, self.log = run, chain, run.log
        self.pipeline, self.storage = run.pipeline, run.storage
        self.versions = {stage: self.pipeline.code_version(stage) for stage in chain}
        self.steps: list = []  # built once Ray is up (they take the cluster's CPU count)
        self.warmup: Optional[Warmup] = None
        # Whether the chain starts at the stage that reads the source (Preprocess): its checks
        # come before any engine build.
        self.reads_source = self.pipeline.plan(chain[0]).upstream is None
        self.commits = Commits(self.pipeline, chain, self.storage, self.versions, run.partitions, self.log)
        self.engine_queue: deque[Unit] = deque()
        self.pool = None
        self.cache: Optional[RunCache] = None
        self.engine_usage: Optional[dict[str, Any]] = None
        self.engine_target: Optional[str] = None  # what the engines serve, while the run may still start them
        self.progress = Progress(self.pipeline.name, self.log, run.stall_report_s)
        self.filesystem = self.storage.filesystem()
        import ray

        self.remote_unit = ray.remote(run_unit)

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> Iterator[Event]:
        import ray

        # Planning reads each partition's manifests and source fingerprint: on S3, requests.
        # Threads overlap them, so a run of 1 000 partitions starts its engines in seconds, and
        # Ray starts meanwhile.
        with ThreadPoolExecutor(max_workers=PLANNING_THREADS, thread_name_prefix="plan") as threads:
            entries = list(
                threads.map(
                    lambda p: plan_entry(
                        self.pipeline, self.chain, p, self.storage, self.versions, self.run_.recompute, self.log
                    ),
                    self.run_.partitions,
                )
            )
        for entry in entries:
            self.commits.keep(entry)
        todo = [e for e in entries if e.index is not None]
        checked = None
        if todo and self.reads_source:
            # Every input file this run reads, read whole here before Ray starts: a bad one fails
            # its partition within seconds, and only it.
            checked = check_sources(self.pipeline, [e.partition for e in todo if e.index == 0], self.run_.copies)
            for partition, problem in checked.problems.items():
                self.commits.fail(partition, SourceError(problem))
            todo = [e for e in todo if e.partition not in checked.problems]
        # A run with nothing left to compute starts no Ray.
        cluster_cpus = self.run_.start_ray() if todo else 0.0
        self.steps = build_steps(self.pipeline, self.chain, cluster_cpus)
        self.warmup = Warmup(self.steps, cluster_cpus, self.log, self.pipeline.name)
        if todo:
            model_s3 = self.run_.engines.model_s3  # for s3:// models (model_store.py)
            self.calls = StageCalls(self.pipeline, self.chain, self.commits, model_s3, self.log)
            runs_engine = ENGINE in self.chain and any(e.index <= self.chain.index(ENGINE) for e in todo)
            reservation = self.run_.engines.reservation(self.pipeline) if runs_engine else None
            check_schedulable(self.pipeline.name, self.steps, reservation)
            self.calls.check_before_run()
            if runs_engine:
                model = self.pipeline.plan(ENGINE).model_source
                self.engine_target = self.calls.models[model] if model else self.pipeline.engine.target()
                self.cache = RunCache.start(
                    self.pipeline,
                    self.calls.models.get(model) if model else None,
                    self.storage,
                    self.run_.recompute,
                    self.log,
                )
                # The engine actors start now (they import the engine library while the CPU stages
                # run), unless the response cache answers the run's first rows: then they start
                # only for a batch with a row the cache lacks, and a run the cache answers whole
                # starts none.
                sample = checked.sample if self.reads_source and todo[0].index == 0 else None
                if self.cache is None or self._first_rows_miss(sample):
                    self._engine_pool()
        yield from self._finished()
        feed = self._feed(todo)
        exhausted = not todo
        try:
            while True:
                while not exhausted and self._backlog_rows() < self._lookahead_rows():
                    unit = next(feed, None)
                    if unit is None:
                        exhausted = True
                        break
                    self._route(unit, step_of(self.steps, self.chain, unit.entry))
                self._dispatch()
                refs = self._refs()
                if not refs:
                    self._log_task_times()
                    break
                # Everything finished by now; else wait up to a second for the next.
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
                if not ready:
                    ready, _ = ray.wait(refs, num_returns=1, timeout=1.0, fetch_local=False)
                for ref in ready:
                    self._settle(ref)
                if self.pool is not None:
                    self.pool.check_start_timeout(self.run_.engines.start_timeout_s)
                yield from self._finished()
                yield None  # a tick: the caller may do its own work without holding up the stream
                self.progress.report(self.commits.summary(), self.pool, self._rows_queued_for_engines(), self.steps)
        except Exception:
            self._cancel()
            yield from self._finished()  # stages whose every partition committed before the failure
            raise
        except BaseException:  # interrupted, or the generator closed: nothing more may be yielded
            self._cancel()
            raise
        finally:
            self._release_engines()
        if self.commits.failed:  # raised once the other partitions are committed
            raise self._failure()

    def _failure(self) -> Exception:
        """The error a run ends with when partitions failed: a run of one partition fails with
        that partition's own error; a run of several names each failed partition."""
        if len(self.run_.partitions) == 1:
            return next(iter(self.commits.failed.values()))
        return PartitionsFailed(self.commits.failed, len(self.run_.partitions))

    def _cancel(self) -> None:
        import ray

        for step in self.steps:
            for ref in list(step.in_flight if step else ()):
                ray.cancel(ref)
        for ref in list(self.cache.lookups if self.cache else ()):
            ray.cancel(ref)
        self.warmup.cancel()

    def _feed(self, todo: list[Entry]) -> Iterator[Unit]:
        chunk_rows = self.pipeline.plan(self.chain[0]).settings.batch_size or self.pipeline.config.batch_size
        for entry in todo:
            self.commits.open(entry)
            try:
                for unit in units(self.pipeline, self.chain, entry, self.storage, chunk_rows, self.run_.copies):
                    if entry.partition in self.commits.failed:
                        break  # failed by a unit already sent: the rest of its file is not read
                    self.commits.expect(unit)
                    yield unit
            except SourceError as exc:  # changed since the check before the run (an S3 object rewritten)
                self.commits.fail(entry.partition, exc)
                continue
            self.commits.input_read(entry)

    def _backlog_rows(self) -> int:
        queued = sum(u.rows for step in self.steps if step for u in step.queue)
        running = sum(u.rows for step in self.steps if step for u, _, _ in step.in_flight.values())
        looking_up = self.cache.rows_in_flight() if self.cache else 0
        return queued + running + looking_up + self._rows_queued_for_engines()

    def _rows_queued_for_engines(self) -> int:
        return sum(u.rows for u in self.engine_queue)

    def _lookahead_rows(self) -> int:
        if self.pool is None:
            return max(2 * step.max_in_flight for step in self.steps if step) * self.pipeline.config.batch_size
        floor = LOOKAHEAD_MIN_ROWS if self.pool.ready else LOOKAHEAD_STARTING_ROWS
        return max(floor, 2 * self.pool.window_rows * len(self.pool.replicas))

    def _route(self, unit: Unit, position: int) -> None:
        if position >= len(self.steps) or unit.partition in self.commits.failed:
            return
        if self.pool is not None and (position > 0 or not self.reads_source):
            # The first unit past Preprocess's checks starts the engine build (bad input never
            # reaches a GPU): the engine compiles while the tokenizer stages load and run.
            self.pool.build()
        step = self.steps[position]
        if step is None and self.cache is not None and not unit.looked_up:
            self.cache.submit(unit)  # back in _settle, with the rows the cache lacks
        elif step is None:
            self.engine_queue.append(unit)
        else:
            step.queue.append(unit)

    def _dispatch(self) -> None:
        engines_building = self.pool is not None and self.pool.building and not self.pool.ready
        if engines_building:
            self.warmup.start(len(self.pool.replicas), self.calls.stages)
        for step in self.steps:
            if step is None:
                while self.engine_queue and self.pool is not None and (replica := self.pool.free_replica()) is not None:
                    unit = self.engine_queue.popleft()
                    if unit.partition not in self.commits.failed:
                        self.pool.submit(replica, unit, unit.ref, unit.rows)
                continue
            while step.queue and step.room(engines_building) and not self.warmup.warming(step):
                unit = step.queue.pop(0)
                file_name = f"part-{unit.seq:05d}-{self.run_.session}.parquet"
                table_ref, written_ref = self.remote_unit.options(**step.options).remote(
                    unit.ref,
                    self.calls.for_unit(step, unit),
                    file_name,
                    self.filesystem,
                    step.secret_env,
                    *(self.cache.task_args(unit) if unit.looked_up else ()),
                )
                step.in_flight[written_ref] = (unit, table_ref, time.time())

    def _refs(self) -> list:
        refs = [ref for step in self.steps if step for ref in step.in_flight]
        refs += list(self.cache.lookups) if self.cache is not None else []
        refs += list(self.warmup.pending)
        return refs + (self.pool.refs() if self.pool is not None else [])

    def _settle(self, ref) -> None:
        import ray

        self.progress.settled()
        if ref in self.warmup.pending:
            self.warmup.settle(ref)
            return
        if self.cache is not None and ref in self.cache.lookups:
            unit, counts = self.cache.settle(ref)
            self.commits.add_cached(unit.partition, counts["hits"], counts["hit_tokens"])
            if counts["misses"]:
                self._engine_pool().build()
                self.engine_queue.append(unit)
            else:
                self._route(unit, self.steps.index(None) + 1)
            return
        for position, step in enumerate(self.steps):
            if step is not None and ref in step.in_flight:
                unit, table_ref, submitted = step.in_flight.pop(ref)
                step.completed += 1
                try:
                    report = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = unwrap(exc)
                    if not isinstance(cause, (RowError, SourceError)):
                        raise cause from None
                    self.commits.fail(unit.partition, cause)
                    return
                step.times.add(submitted, report)
                self.commits.written(unit, report["written"])
                unit.ref = table_ref
                self._route(unit, position + 1)
                self.commits.commit_ready(unit.partition)
                return
        try:
            done, lost = self.pool.settle(ref)
        except BatchFailed as failed:
            self.commits.fail(failed.tag.partition, failed.error)
            return
        for unit, output_ref in done:
            self.progress.engine_rows_done += unit.rows
            unit.ref = output_ref
            self._route(unit, self.steps.index(None) + 1)
        for unit, _, _ in reversed(lost):
            self.engine_queue.appendleft(unit)

    # --- reports --------------------------------------------------------------------------
    def _log_task_times(self) -> None:
        for step in self.steps:
            if step is not None and step.times.tasks:
                self.log(f"{self.pipeline.name}: {step.times.line(step.label())}")

    def _finished(self) -> Iterator[Event]:
        for stage, stats in self.commits.drain_committed():
            yield PartitionCommitted(stage, stats)
        for stage in self.commits.newly_finished():
            if stage == ENGINE:
                self._release_engines()
            usage = self.engine_usage if stage == ENGINE else None
            results = self.commits.results[stage]
            yield StageDone(
                stage,
                [results[p] for p in self.run_.partitions if p in results],
                usage,
                [p for p in self.run_.partitions if p not in results],
            )

    def _engine_pool(self):
        """The run's engine pool, its actors created on first need (they begin importing the engine
        library at once; ``build()`` starts the engines)."""
        if self.pool is None and self.engine_target is not None:
            self.pool = self.run_.engines.pool_for(self.pipeline, self.engine_target, self.log)
        return self.pool

    def _first_rows_miss(self, sample) -> bool:
        """Whether the run's first rows, taken through the stages before the engine here in the
        run's process, ask what the response cache lacks. Without a sample to tell (or stages
        too heavy to run here: media), assume so."""
        before_engine = self.chain[: self.chain.index(ENGINE)]
        plans = [self.pipeline.plan(stage) for stage in before_engine]
        if sample is None or "prepare_multimodal" in before_engine or any(plan.settings.runtime_env for plan in plans):
            return True
        try:
            for plan in plans:
                sample = plan.udf(**self.calls.udf_kwargs(plan))(sample)
        except (RowError, ValueError, OSError) as exc:
            self.log(
                f"Response cache: the first rows could not be looked up before the run ({first_line(exc)}); "
                "the engines start now"
            )
            return True
        return self.cache.misses(sample)

    def _release_engines(self) -> None:
        self.engine_target = None  # none is started after this
        if self.pool is not None:
            self.engine_usage = self.pool.usage()
            self.run_.engines.release(self.pool)
            self.pool = None
        elif self.engine_usage is None:
            self.engine_usage = NO_ENGINE_USAGE
