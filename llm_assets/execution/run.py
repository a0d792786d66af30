"""A run: the selected stages of a pipeline over the run's partitions, as one Ray Data dataset per
chain of consecutive stages (``execution/dataset.py``), committed partition by partition.

Before any stage runs, the run plans where each partition enters (``plan.py``) and reads every
input file it will read (``preflight.py``; Ray starts meanwhile once one file has passed): a bad
file fails its partition only, within seconds. Then it resolves models, checks what each stage
needs before any work (a chat template, say) and that the cluster could ever schedule the run,
creates the attempt folders, and executes the dataset.
The rows never come back to the run's process: the tasks write each stage's files themselves and
tell the run's ledger (``ledger.py``); what comes back is how many rows of each partition left
the chain, and a partition whose every row has left is committed, every stage of it, at once.

The run's process reads Ray Data's output in a thread and keeps the main thread for Dagster:
events (each partition committed, each stage done), progress lines, stall reports, and the
engine start timeout (a hook in Ray Data's scheduling loop ends the execution).
"""

from __future__ import annotations

import gc
import queue
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

from llm_assets.errors import SourceError
from llm_assets.execution import dataset as datasets
from llm_assets.execution import engines as run_engines
from llm_assets.execution.cache import RunCache
from llm_assets.execution.commits import Commits
from llm_assets.execution.cpu_stages import Targets
from llm_assets.execution.engine_stage import EngineStartError, first_line
from llm_assets.execution.events import Event, PartitionCommitted, PartitionsFailed, StageDone
from llm_assets.execution.ledger import start_ledger
from llm_assets.execution.monitor import Monitor
from llm_assets.execution.plan import Entry, chains, plan_entry, read_items
from llm_assets.execution.preflight import check_sources_while_ray_starts
from llm_assets.execution.schedulable import check_schedulable
from llm_assets.execution.stats import operator_times
from llm_assets.models import resolve_model_source
from llm_assets.rows import RowError
from llm_assets.tasks import ENGINE

Log = Callable[[str], None]
PLANNING_THREADS = 16
# What a run's engines held when none was started.
NO_ENGINE_USAGE = {"engine_seconds": 0.0, "gpu_seconds": 0.0, "engine_starts": 0, "placement": []}
TICK_S = 1.0
# How long a run waits, once its execution is done, for its engine actors to end (their GPUs freed).
ENGINE_END_WAIT_S = 30.0


class Run:
    def __init__(
        self,
        pipeline,
        selected: list[str],
        partitions: list[str],
        storage,
        engines: run_engines.RunEngines,
        start_ray: Callable[[], float],
        log: Log = print,
        recompute: bool = False,
        stall_report_s: float = 120.0,
    ):
        """``start_ray`` starts (or connects to) Ray and returns the cluster's CPUs."""
        self.pipeline, self.partitions, self.storage, self.engines, self.log = (
            pipeline,
            partitions,
            storage,
            engines,
            log,
        )
        self.recompute, self.stall_report_s, self.start_ray = recompute, stall_report_s, start_ray
        self.chains = chains(pipeline, selected)

    def run(self) -> Iterator[Event]:
        """Yields each partition of a stage as it is committed, each stage once all its partitions
        are (or failed), and None now and then. Raises PartitionsFailed, after the rest is
        committed, when some partitions failed."""
        with tempfile.TemporaryDirectory(prefix="llm-assets-inputs-") as copies:
            for chain in self.chains:
                yield from _ChainRun(self, chain, copies).run()


class _ChainRun:
    def __init__(self, run: Run, chain: list[str], copies: str):
        self.run_, self.chain, self.copies, self.log = run, chain, copies, run.log
        self.pipeline, self.storage = run.pipeline, run.storage
        self.versions = {stage: self.pipeline.code_version(stage) for stage in chain}
        self.commits = Commits(self.pipeline, chain, self.storage, self.versions, run.partitions, self.log)
        self.monitor: Optional[Monitor] = None
        self.models: dict[str, str] = {}
        self.engine_op: Optional[datasets.EngineOp] = None

    def run(self) -> Iterator[Event]:
        with ThreadPoolExecutor(max_workers=PLANNING_THREADS, thread_name_prefix="plan") as threads:
            # Planning reads each partition's manifests and source fingerprint: on S3, requests.
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
        reads_source = self.pipeline.plan(self.chain[0]).upstream is None
        if todo and reads_source:
            # Every input file this run reads, read whole before any stage runs: a bad one fails its
            # partition within seconds, and only it (Ray starts meanwhile once one file has passed).
            checked = check_sources_while_ray_starts(
                self.pipeline, [e.partition for e in todo if e.index == 0], self.copies, self.run_.start_ray
            )
            for partition, problem in checked.problems.items():
                self.commits.fail(partition, SourceError(problem))
            for entry in todo:
                entry.rows = checked.rows.get(entry.partition, entry.rows)
            todo = [e for e in todo if e.partition not in checked.problems]
        sample = checked.sample if todo and reads_source and todo[0].index == 0 else None
        yield from self._finished()
        if todo:  # a run with nothing left to compute starts no Ray
            deferred = yield from self._execute(todo, sample)
            if deferred:  # rows the cache did not answer after all: their partitions again, with engines
                self.log(
                    f"{self.pipeline.name}: {len(deferred)} partition(s) had rows the response cache did not "
                    f"answer ({', '.join(deferred[:5])}); running their engine stage and the stages after it"
                )
                again = [
                    plan_entry(self.pipeline, self.chain, p, self.storage, self.versions, False, self.log)
                    for p in deferred
                ]
                yield from self._execute([e for e in again if e.index is not None], None, cache_only=False)
        yield from self._finished()
        if self.commits.failed:  # raised once the other partitions are committed
            raise self._failure()

    def _execute(self, todo: list[Entry], sample, cache_only: Optional[bool] = None) -> Iterator[Event]:
        """One Ray Data execution over these partitions; returns the partitions deferred to a run
        with engines (a run the response cache was to answer whole, with rows it did not)."""
        cluster_cpus = self.run_.start_ray()
        models = self.models = self._models()
        stage_kwargs = {stage: self._udf_kwargs(stage, models) for stage in self.chain if stage != ENGINE}
        for stage, kwargs in stage_kwargs.items():  # each stage's own check (a chat template, say)
            check = getattr(self.pipeline.plan(stage).udf, "check_before_run", None)
            if check is not None:
                check(**kwargs)
        runs_engine = ENGINE in self.chain and any(e.index <= self.chain.index(ENGINE) for e in todo)
        engines = self.run_.engines
        engine_op, groups, cache = None, None, None
        if runs_engine:
            model = self.pipeline.plan(ENGINE).model_source
            cache = RunCache.start(
                self.pipeline, models.get(model) if model else None, self.storage, self.run_.recompute, self.log
            )
            if cache_only is None:
                cache_only = cache is not None and sample is not None and not self._sample_misses(sample, cache)
            if cache_only:
                self.log(
                    f"{self.pipeline.name}: the response cache answers a sample of this run's rows: the run starts "
                    "no engine (partitions with a row it does not answer are taken again with engines)"
                )
            else:
                target = models[model] if model else self.pipeline.engine.target()
                engine_op, groups = engines.operator(self.pipeline, target, self.log)
        held = datasets.smallest_pools(
            self.pipeline, self.chain, {e.index for e in todo}, engine_op, cluster_cpus, cache
        )
        check_schedulable(self.pipeline, self.chain, engines.reservation(self.pipeline) if engine_op else None, held)
        ledger = start_ledger()
        folders: dict[tuple[str, str], str] = {}
        infos: dict[str, dict] = {}
        reads: dict[int, list] = {}
        for entry in todo:
            opened, recorded = self.commits.open(entry)
            folders.update(opened)
            infos.update(recorded)
            reads.setdefault(entry.index, []).extend(
                read_items(self.pipeline, self.chain, entry, self.storage, self.copies)
            )
        ledger.expect.remote({entry.partition: self.commits.expected_rows(entry) for entry in todo})
        data = datasets.ChainData(
            self.pipeline,
            self.chain,
            reads,
            Targets(self.storage.filesystem(), folders, infos),
            ledger,
            stage_kwargs,
            cluster_cpus,
            engine_op,
            (cache.index_ref(), cache.settings) if cache is not None else None,
        )
        needs = (engine_op.size, _needs(engine_op, groups), engine_op.target) if engine_op is not None else None
        self.monitor = Monitor(
            self.pipeline, ledger, needs, engines.start_timeout_s, self.run_.stall_report_s, self.log
        )
        self.engine_op = engine_op
        try:
            yield from self._stream(datasets.build(data), {e.partition: e for e in todo}, self.monitor)
        finally:
            self.monitor.detach()
            if groups is not None:
                groups.release(self.log)
        return self.monitor.deferrals()

    def _stream(self, dataset, entries: dict[str, Entry], monitor: Monitor) -> Iterator[Event]:
        """Execute the dataset; commit each stage of a partition once its files hold all its rows."""
        outputs: queue.Queue = queue.Queue()
        monitor.attach(dataset)
        reader = threading.Thread(target=_drain, args=(dataset, outputs), name="ray-data-output", daemon=True)
        reader.start()
        try:
            while True:
                try:
                    item = outputs.get(timeout=TICK_S)
                except queue.Empty:
                    item = None
                self._commit_complete(monitor, entries)
                if isinstance(item, BaseException):
                    raise monitor.reason(item) or item
                yield from self._finished()
                if item is _DONE:
                    break
                yield None
                monitor.report(self.commits.summary())
        except BaseException:
            monitor.abort()
            reader.join(timeout=30)
            raise
        for line in operator_times(dataset):
            self.log(f"{self.pipeline.name}: {line}")
        unfinished = monitor.unfinished()
        if unfinished:
            raise RuntimeError(
                f"{self.pipeline.name}: the run ended with rows of {len(unfinished)} partition(s) missing "
                f"({', '.join(unfinished[:5])}): their stages past the last complete one were not committed"
            )
        # The engines shut down when the ledger says the execution is over, and the run waits
        # for them; Ray Data ends its actors by dropping its handles to them, once the run lets go
        # of the dataset and its executor too.
        monitor.log_engine_reports(ENGINE_END_WAIT_S)
        monitor.executor = None
        del dataset
        gc.collect()

    def _commit_complete(self, monitor: Monitor, entries: dict[str, Entry]) -> None:
        for partition, problem in monitor.new_failures():
            self.commits.fail(partition, problem)
        for partition, stage, records in monitor.complete():
            self.commits.commit(entries[partition], stage, records)

    def _sample_misses(self, sample, cache: RunCache) -> bool:
        """Whether rows spread over the run's files, taken through the stages before the engine
        here in the run's process, ask what the response cache lacks. Stages too heavy to run
        here (media, a runtime_env of their own) cannot tell: assume so."""
        before_engine = self.chain[: self.chain.index(ENGINE)]
        plans = [self.pipeline.plan(stage) for stage in before_engine]
        if "prepare_multimodal" in before_engine or any(plan.settings.runtime_env for plan in plans):
            return True
        try:
            for plan in plans:
                sample = plan.udf(**self._udf_kwargs(plan.name, self.models))(sample)
        except (RowError, ValueError, OSError) as exc:
            self.log(f"Response cache: a sample of the run's rows could not be looked up ({first_line(exc)})")
            return True
        return cache.misses(sample)

    def _models(self) -> dict[str, str]:
        sources = {self.pipeline.plan(stage).model_source for stage in self.chain} - {None}
        return {source: resolve_model_source(source, self.log, self.run_.engines.model_s3) for source in sources}

    def _udf_kwargs(self, stage: str, models: dict[str, str]) -> dict:
        plan = self.pipeline.plan(stage)
        kwargs = dict(plan.udf_kwargs)
        if plan.model_source:
            kwargs["model_source"] = models[plan.model_source]
        return kwargs

    def _engine_usage(self) -> dict[str, Any]:
        """What the run's engines held so far (none: the run started none)."""
        if self.engine_op is None:
            return NO_ENGINE_USAGE
        snapshot = self.monitor.snapshot()
        gpus_each = self.engine_op.options.get("num_gpus", 0)
        return run_engines.usage(snapshot.get("engines", {}), snapshot.get("engine_builds", 0), gpus_each)

    def _failure(self) -> Exception:
        """A run of one partition fails with that partition's own error; of several, naming each."""
        if len(self.run_.partitions) == 1:
            return next(iter(self.commits.failed.values()))
        return PartitionsFailed(self.commits.failed, len(self.run_.partitions))

    def _finished(self) -> Iterator[Event]:
        for stage, stats in self.commits.drain_committed():
            yield PartitionCommitted(stage, stats)
        for stage in self.commits.newly_finished():
            usage = self._engine_usage() if stage == ENGINE else None
            results = self.commits.results[stage]
            yield StageDone(
                stage,
                [results[p] for p in self.run_.partitions if p in results],
                usage,
                [p for p in self.run_.partitions if p not in results],
            )


_DONE = object()


def _drain(dataset, outputs: queue.Queue) -> None:
    """Execute the dataset in a thread (its output is small: rows per partition that left the
    chain; the files are the output): then _DONE, or the error, to the run's thread."""
    try:
        for _ in dataset.iter_internal_ref_bundles():
            pass
        outputs.put(_DONE)
    except BaseException as exc:  # handed to the run's thread, which raises it
        outputs.put(exc)


def _needs(op: datasets.EngineOp, groups) -> str:
    """What one engine actor needs from Ray, for a stall report."""
    if groups is not None:
        return f"a placement group of {groups.placement.describe()}"
    needs = [f"{op.options.get(key, 0):g} {name}" for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU"))]
    return ", ".join(n for n in needs if not n.startswith("0 ")) or "no resources"


__all__ = ["Run", "StageDone", "PartitionCommitted", "PartitionsFailed", "EngineStartError", "first_line"]
