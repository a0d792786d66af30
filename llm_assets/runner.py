"""Running one stage of a pipeline over one or more partitions, without Dagster.

CPU stages: read the upstream partition (committed Parquet, or the source file for Preprocess) with
Ray Data, ``map_batches`` the stage UDF on an actor pool, stream the output batches into the
partition's writer, commit. The engine stage streams every partition of the run through one engine
pool back to back (no drain between partitions) and commits each partition when its last batch is
back. Either way the driver holds a few batches at a time, never a whole partition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from llm_assets.models import resolve_model_source
from llm_assets.pipeline import ENGINE, LLMPipeline, StagePlan
from llm_assets.secret_env import applied as secret_env_applied
from llm_assets.secret_env import split_runtime_env
from llm_assets.stages.base import ERROR_COLUMN, ROW_ID

PROGRESS_EVERY_S = 10.0
Log = Callable[[str], None]


@dataclass
class PartitionStats:
    partition: str
    rows_in: int = 0
    rows_out: int = 0
    input_tokens: int = 0
    generated_tokens: int = 0
    errors: int = 0
    seconds: float = 0.0
    path: str = ""
    code_version: str = ""
    input: str = ""  # what it was computed from: the upstream commit's attempt, or the source file's fingerprint
    rows_resumed: int = 0  # rows kept from an interrupted attempt (engine checkpoints), not generated again
    skipped: bool = False  # already committed with the same code version and input: not recomputed
    started: float = field(default_factory=time.monotonic)

    def add(self, batch: pa.Table) -> None:
        self.rows_out += batch.num_rows
        names = batch.column_names
        if "num_input_tokens" in names:
            self.input_tokens += _sum(batch.column("num_input_tokens"))
        elif "tokenized_prompt" in names:
            self.input_tokens += _sum(pc.list_value_length(batch.column("tokenized_prompt")))
        if "num_generated_tokens" in names:
            self.generated_tokens += _sum(batch.column("num_generated_tokens"))
        if ERROR_COLUMN in names:
            self.errors += batch.num_rows - batch.column(ERROR_COLUMN).null_count

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("started", "skipped")}

    @classmethod
    def from_manifest(cls, stats: dict[str, Any]) -> "PartitionStats":
        known = {k: v for k, v in stats.items() if k in cls.__dataclass_fields__}
        return cls(**known, skipped=True)


# The columns PartitionStats.add reads (and the row ids), read back from adopted checkpoint files.
STATS_COLUMNS = (ROW_ID, "num_input_tokens", "tokenized_prompt", "num_generated_tokens", ERROR_COLUMN)


def _sum(column) -> int:
    return int(pc.sum(column).as_py() or 0)


class Progress:
    """Logs rows done every PROGRESS_EVERY_S seconds, so long stages show they are alive."""

    def __init__(self, stage: str, total_rows: int, log: Log):
        self.stage, self.total, self.log = stage, total_rows, log
        self.done = 0
        self.started = self.last = time.monotonic()

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            total = f"/{self.total}" if self.total else ""
            self.log(f"{self.stage}: {self.done}{total} rows done, {rate:.1f} rows/s")


def run_stage(
    pipeline: LLMPipeline,
    stage: str,
    partitions: list[str],
    storage,
    engine_pool=None,
    log: Log = print,
    recompute: bool = False,
) -> list[PartitionStats]:
    """Run ``stage`` for ``partitions``.

    A partition already committed with the stage's current code version from the same input (the
    upstream's current commit, or the same source file) is not recomputed, unless ``recompute``:
    re-running a backfill redoes only what is missing or stale.

    Given an ``engine_pool`` for a stage before the engine, the engine actors are created at once
    and import vLLM while CPU stages run; the engines themselves are built (GPU memory, compile)
    only once the rows have passed Preprocess's checks: bad input never reaches a GPU.
    """
    plan = pipeline.plan(stage)
    code_version = pipeline.code_version(stage)
    kept: dict[str, PartitionStats] = {}
    for partition in partitions:
        current = None if recompute else _committed_and_current(pipeline, plan, partition, storage, code_version)
        if current is not None:
            kept[partition] = current
            log(f"{stage} [{partition}]: up to date (code version {code_version}, same input); not recomputed")
    todo = [p for p in partitions if p not in kept]
    progress = PartitionProgress(stage, len(todo), log)
    if stage == ENGINE:
        done = _run_engine(pipeline, plan, todo, storage, engine_pool, code_version, progress) if todo else []
    else:
        done = _run_cpu_stage_partitions(pipeline, plan, todo, storage, engine_pool, code_version, progress)
    by_partition = {**kept, **{stats.partition: stats for stats in done}}
    return [by_partition[p] for p in partitions]


def _run_cpu_stage_partitions(pipeline, plan: StagePlan, partitions: list[str], storage, engine_pool, code_version: str, progress) -> list[PartitionStats]:
    log = progress.log
    if not partitions:
        return []
    model_source = resolve_model_source(plan.model_source, log) if plan.model_source else None
    if engine_pool is not None:
        # Before Preprocess has checked the rows, the engine actors only import vLLM (no GPU work).
        start = engine_pool.prepare if plan.upstream is None else engine_pool.prestart
        start(*_engine_pool_args(pipeline, log), log)
    results = [_run_cpu_stage(pipeline, plan, partition, storage, model_source, code_version, progress) for partition in partitions]
    if engine_pool is not None and plan.upstream is None:
        _check_stages_before_engine(pipeline, log)
        engine_pool.prestart(*_engine_pool_args(pipeline, log), log)
    return results


def _check_stages_before_engine(pipeline: LLMPipeline, log: Log) -> None:
    """Build the CPU stages between Preprocess and the engine once here, so that a setup error
    (a model without a chat template, a tokenizer that does not load) fails the run before an
    engine is built. Off the critical path: the engine actors are still importing vLLM."""
    names = pipeline.stage_names()
    for stage in names[1 : names.index(ENGINE)]:
        plan = pipeline.plan(stage)
        if plan.model_source:
            plan.udf(**plan.udf_kwargs, model_source=resolve_model_source(plan.model_source, log))


def _input_identity(pipeline: LLMPipeline, plan: StagePlan, partition: str, storage) -> str:
    if plan.upstream is None:
        return pipeline.source.fingerprint(partition)
    upstream = storage.manifest(pipeline.name, plan.upstream, partition)
    return upstream.attempt if upstream is not None else ""


def _committed_and_current(pipeline, plan: StagePlan, partition: str, storage, code_version: str) -> Optional[PartitionStats]:
    manifest = storage.manifest(pipeline.name, plan.name, partition)
    if manifest is None or manifest.stats.get("code_version") != code_version:
        return None
    try:
        current_input = _input_identity(pipeline, plan, partition, storage)
    except Exception:  # the source file is gone or unreadable: recompute, and fail there clearly
        return None
    if not current_input or manifest.stats.get("input") != current_input:
        return None
    return PartitionStats.from_manifest(manifest.stats)


class PartitionProgress:
    """Counts committed partitions, so a backfill's log shows how far it got."""

    def __init__(self, stage: str, total: int, log: Log):
        self.stage, self.total, self.log, self.done = stage, total, log, 0

    def committed(self, stats: PartitionStats) -> None:
        self.done += 1
        self.log(
            f"{self.stage} [{stats.partition}]: committed {stats.rows_out} rows in {stats.seconds:.1f} s "
            f"({self.done}/{self.total} partitions) -> {stats.path}"
        )


def _engine_pool_args(pipeline: LLMPipeline, log: Log) -> tuple:
    config = pipeline.config
    # Without a Detokenize stage the engine writes generated_text itself.
    engine_detokenizes = not config.stage("detokenize_stage").enabled
    return config, resolve_model_source(config.model_source, log), engine_detokenizes


def _input_dataset(pipeline: LLMPipeline, plan: StagePlan, partition: str, storage, stats: PartitionStats):
    import ray
    import ray.data

    if plan.upstream is None:
        # Read in the driver (row ids need the file order), one object per chunk.
        refs = []
        for chunk in pipeline.source.read(partition, chunk_rows=plan.settings.batch_size or 1024):
            stats.rows_in += chunk.num_rows
            refs.append(ray.put(chunk))
        return ray.data.from_arrow_refs(refs)
    manifest, files = storage.committed(pipeline.name, plan.upstream, partition)
    stats.rows_in = manifest.rows
    return _read_committed(files, storage)


def _read_parquet_file(path: str, filesystem) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(path, filesystem=filesystem)


def _read_committed(files: list[str], storage):
    """A dataset over a partition's committed files, one Ray task reading each file.

    ``ray.data.read_parquet`` spent ~5 s planning each read on a 2-core machine, even for 20 rows
    (metadata and size sampling): that was most of a small stage's time, on every stage and
    partition. The manifest already lists the files, so plain reads into the object store suffice.
    """
    import ray
    import ray.data

    read = ray.remote(num_cpus=0.25)(_read_parquet_file)
    filesystem = storage.filesystem()
    return ray.data.from_arrow_refs([read.remote(path, filesystem) for path in files])


def _apply_stage(batch: pa.Table, udf: type, udf_kwargs: dict[str, Any], secret_env: dict[str, str]) -> pa.Table:
    # CPU stages run as Ray tasks, not actors: task workers are reused across stages and runs,
    # so transformers is imported and the tokenizer loaded (cached) once per worker process,
    # where a fresh actor pool per stage paid ~10 s of imports on every stage.
    with secret_env_applied(secret_env):
        return udf(**udf_kwargs)(batch)


def _task_pool(settings):
    import ray.data

    concurrency = settings.concurrency or 1
    return ray.data.TaskPoolStrategy(size=concurrency if isinstance(concurrency, int) else concurrency[1])


def _run_cpu_stage(pipeline, plan: StagePlan, partition: str, storage, model_source: Optional[str], code_version: str, progress) -> PartitionStats:
    log = progress.log
    stats = PartitionStats(partition, code_version=code_version, input=_input_identity(pipeline, plan, partition, storage))
    dataset = _input_dataset(pipeline, plan, partition, storage, stats)
    kwargs = dict(plan.udf_kwargs)
    if model_source is not None:
        kwargs["model_source"] = model_source
    settings = plan.settings
    remote_args: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if settings.memory:
        remote_args["memory"] = settings.memory
    runtime_env, secret_env = split_runtime_env(settings.runtime_env)
    if runtime_env:
        remote_args["runtime_env"] = runtime_env
    mapped = dataset.map_batches(
        _apply_stage,
        fn_kwargs={"udf": plan.udf, "udf_kwargs": kwargs, "secret_env": secret_env},
        # Preprocess sees the source chunks as they are (their schemas may differ row to row).
        batch_size=None if plan.upstream is None else settings.batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=_task_pool(settings),
        **remote_args,
    )
    writer = storage.writer(pipeline.name, plan.name, partition)
    rows_progress = Progress(f"{plan.name} [{partition}]", stats.rows_in, log)
    try:
        for batch in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.write(batch)
            stats.add(batch)
            rows_progress.advance(batch.num_rows)
    except BaseException:
        writer.abort()
        raise
    return _commit(writer, stats, progress, storage)


def _commit(writer, stats: PartitionStats, progress: PartitionProgress, storage) -> PartitionStats:
    stats.seconds = round(time.monotonic() - stats.started, 3)
    stats.path = storage.uri(writer.partition_dir)
    writer.commit(stats.as_dict())
    progress.committed(stats)
    return stats


def _run_engine(pipeline, plan: StagePlan, partitions: list[str], storage, engine_pool, code_version: str, partition_progress: PartitionProgress):
    log = partition_progress.log
    config = pipeline.config
    stats = {p: PartitionStats(p, code_version=code_version) for p in partitions}
    # Every upstream partition must be committed: checked before waiting on any engine.
    inputs = {}
    for partition in partitions:
        manifest, inputs[partition] = storage.committed(pipeline.name, plan.upstream, partition)
        stats[partition].rows_in = manifest.rows
        stats[partition].input = manifest.attempt
    # Rows an interrupted run already wrote (same code version, same input) are kept, not resent.
    writers: dict[str, Any] = {}
    done_ids: dict[str, pa.Array] = {}
    for partition in partitions:
        writers[partition], done_ids[partition] = _resume(storage, pipeline, plan, stats[partition], log)
    results = [_commit(writers.pop(p), stats[p], partition_progress, storage) for p in partitions if stats[p].rows_resumed == stats[p].rows_in]
    todo = [p for p in partitions if p in writers]
    if not todo:
        return results
    pool = engine_pool.get_pool(*_engine_pool_args(pipeline, log), log)

    outstanding = {p: 0 for p in todo}
    fully_read: set[str] = set()
    progress = Progress(f"engine [{len(todo)} partition(s)]", sum(stats[p].rows_in - stats[p].rows_resumed for p in todo), log)

    def batches() -> Iterator[tuple[str, pa.Table]]:
        for partition in todo:
            dataset = _read_committed(inputs[partition], storage)
            stats[partition].started = time.monotonic()
            for batch in dataset.iter_batches(batch_size=config.batch_size, batch_format="pyarrow"):
                if len(done_ids[partition]):
                    batch = batch.filter(pc.invert(pc.is_in(batch.column(ROW_ID), value_set=done_ids[partition])))
                    if batch.num_rows == 0:
                        continue
                outstanding[partition] += 1
                yield partition, batch
            fully_read.add(partition)

    try:
        for partition, output in pool.map(batches()):
            writers[partition].write(output)
            stats[partition].add(output)
            progress.advance(output.num_rows)
            outstanding[partition] -= 1
            # Commit each partition as soon as all of it is back (the input generator marks a
            # partition fully read only when it moves past it, hence the sweep).
            for done in [p for p in writers if p in fully_read and outstanding[p] == 0]:
                results.append(_commit(writers.pop(done), stats[done], partition_progress, storage))
        for done in list(writers):
            results.append(_commit(writers.pop(done), stats[done], partition_progress, storage))
    except BaseException:
        for writer in writers.values():
            writer.suspend()  # its complete files stay for the next run to adopt
        raise
    return results


def _resume(storage, pipeline, plan: StagePlan, stats: PartitionStats, log: Log) -> tuple[Any, pa.Array]:
    """The partition's checkpointed writer, and the row ids its adopted files already hold."""
    import pyarrow.parquet as pq

    info = {"code_version": stats.code_version, "input": stats.input}
    writer, adopted = storage.resumable_writer(pipeline.name, plan.name, stats.partition, info)
    if not adopted:
        return writer, pa.array([], pa.string())
    filesystem = storage.filesystem()
    ids = []
    for path in adopted:
        names = pq.ParquetFile(path, filesystem=filesystem).schema_arrow.names
        table = pq.read_table(path, filesystem=filesystem, columns=[c for c in STATS_COLUMNS if c in names])
        stats.add(table)
        ids.append(table.column(ROW_ID))
    stats.rows_resumed = stats.rows_out
    log(
        f"engine [{stats.partition}]: resuming an interrupted attempt ({writer.attempt}): {stats.rows_resumed} of "
        f"{stats.rows_in} rows already written are kept; the other {stats.rows_in - stats.rows_resumed} go to the engine"
    )
    return writer, pa.chunked_array(ids).combine_chunks()
