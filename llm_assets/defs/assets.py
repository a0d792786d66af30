"""The stages of a pipeline as one subsettable, partitioned multi-asset: one step per run.

Each stage keeps its own asset key, code version, checks, metadata and committed Parquet per
partition (the asset graph shows one asset per stage), but whatever launches the run — the job,
"Materialize" in the UI, an asset backfill, a sensor — the selected stages execute in one step:
one process, one Ray, one engine pool, one Ray Data run (``execution/run.py``). With the
single-run backfill policy a backfill is one run too, so the model loads once.
"""

import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Optional, Union

import dagster as dg

from llm_assets.defs import checks, dead_runs
from llm_assets.execution.events import PartitionCommitted, StageDone
from llm_assets.execution.run import Run
from llm_assets.execution.stats import SAMPLES_KEPT, PartitionStats
from llm_assets.pipeline import LLMPipeline
from llm_assets.private_apis import dagster_data_version_tags
from llm_assets.tasks import ENGINE

# Run tag: recompute partitions even when their committed output is current.
RECOMPUTE_TAG = "llm_assets/recompute"

# The single-run backfill policy is what loads the engine once per backfill; Dagster flags it beta.
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=dg.BetaWarning)

STAGE_DESCRIPTIONS = {
    "preprocess": "Rows of the input file after the pipeline's preprocess function; each gets a stable row_id.",
    "prepare_multimodal": "Image, audio and video parts of `messages` read and decoded; "
    "`messages` with the model's placeholders, "
    "`multimodal_data` with each part's bytes (inline media) or reference and digest (URLs, paths).",
    "chat_template": "`messages` rendered to a `prompt` with the model's chat template.",
    "tokenize": "`prompt` tokenized to `tokenized_prompt`.",
    ENGINE: "Each row with the engine's output columns: vLLM's `generated_tokens`, `num_input_tokens`, "
    "`num_generated_tokens`, "
    "`time_taken_llm`; an HTTP endpoint's `http_response`, `generated_text` and the token counts.",
    "detokenize": "`generated_tokens` decoded to `generated_text`.",
    "postprocess": "Rows after the pipeline's postprocess function: the pipeline's output.",
}


def landing_key(pipeline: LLMPipeline) -> dg.AssetKey:
    return dg.AssetKey([pipeline.name, "landing_files"])


def stage_key(pipeline: LLMPipeline, stage: str) -> dg.AssetKey:
    return dg.AssetKey([pipeline.name, stage])


def metadata(
    results: list[PartitionStats], usage: Optional[dict[str, float]] = None, price_per_gpu_hour: Optional[float] = None
) -> dict[str, Any]:
    """Numeric metadata, so the asset page plots it across materializations. A multi-partition
    run (a backfill) records the run's totals on each of its partitions (Dagster attaches one
    result to all partitions of a run); each partition's own numbers are in its manifest.
    ``usage``: what the run's engines held (the engine stage's), priced where a price is set."""
    seconds = max(sum(r.seconds for r in results), 1e-9)
    rows_out = sum(r.rows_out for r in results)
    generated = sum(r.generated_tokens for r in results)
    found: dict[str, Any] = {
        "rows_in": sum(r.rows_in for r in results),
        "rows_out": rows_out,
        "input_tokens": sum(r.input_tokens for r in results),
        "generated_tokens": generated,
        "errors": sum(r.errors for r in results),
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_out / seconds, 2),
        "generated_tokens_per_s": round(generated / seconds, 2),
        "error_rate": round(sum(r.errors for r in results) / max(rows_out, 1), 6),
        "partitions": len(results),
        "partitions_recomputed": sum(not r.skipped for r in results),
    }
    for name in sorted({name for r in results for name in r.extra}):  # the engine's own counts: retries, say
        found[name] = sum(r.extra.get(name, 0) for r in results)
    if any(r.rows_resumed for r in results):
        found["rows_resumed"] = sum(r.rows_resumed for r in results)
    if any(r.rows_cached for r in results):
        found["rows_cached"] = sum(r.rows_cached for r in results)
    if usage is not None:
        found["engine_seconds"], found["gpu_seconds"] = usage["engine_seconds"], usage["gpu_seconds"]
        found["engine_starts"] = usage["engine_starts"]  # engines built by the run, replacements included
        # Where each engine ran: Ray node, host, GPU ids.
        found["engine_placement"] = dg.MetadataValue.json(usage["placement"])
        if price_per_gpu_hour is not None:
            found["estimated_cost"] = round(usage["gpu_seconds"] / 3600 * price_per_gpu_hour, 4)
    if len(results) == 1:
        found["path"] = dg.MetadataValue.path(results[0].path)
    # Dagster's own keys: the UI shows them as the asset's row count, columns and location.
    found["dagster/row_count"] = dg.MetadataValue.int(rows_out)
    if results[0].path:
        uri = (
            results[0].path if len(results) == 1 else results[0].path.rsplit("/", 1)[0]
        )  # a run's partitions: the stage's folder
        found["dagster/uri"] = dg.MetadataValue.path(uri)
    columns = next((r.columns for r in results if r.columns), None)
    if columns:
        found["dagster/column_schema"] = dg.MetadataValue.table_schema(
            dg.TableSchema(columns=[dg.TableColumn(n, t) for n, t in columns])
        )
    samples = [sample for r in results for sample in r.samples][:SAMPLES_KEPT]
    if samples:
        found["sample"] = dg.MetadataValue.md(_sample_table(samples))
    return found


def _sample_table(samples: list[dict[str, str]]) -> str:
    """A few rows as a Markdown table: the prompt and what the model generated."""
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| prompt | generated_text |", "|---|---|"]
    lines += [f"| {cell(s['prompt'])} | {cell(s['generated_text'])} |" for s in samples]
    return "\n".join(lines)


class _Checking:
    """The data-reading checks, in threads beside the stream: each partition as soon as it is
    committed; a stage's materialization is yielded once all its partitions are checked."""

    def __init__(
        self,
        pipeline: LLMPipeline,
        storage,
        wanted: set,
        threads: ThreadPoolExecutor,
        price_per_gpu_hour: Optional[float],
    ):
        self.pipeline, self.storage, self.threads, self.price_per_gpu_hour = (
            pipeline,
            storage,
            threads,
            price_per_gpu_hour,
        )
        # The checks of each stage the run was asked for (looked up for every committed partition).
        self.names = {
            stage: {
                spec.name
                for spec in checks.check_specs(pipeline, stage, stage_key(pipeline, stage))
                if dg.AssetCheckKey(stage_key(pipeline, stage), spec.name) in wanted
            }
            for stage in pipeline.stage_names()
        }
        self.partitions: dict[tuple[str, str], Future] = {}
        self.stages: deque[tuple[StageDone, list[Future]]] = deque()

    def committed(self, stage: str, stats: PartitionStats) -> None:
        self.partitions[(stage, stats.partition)] = self._submit(stage, stats)

    def stage_done(self, done: StageDone) -> None:
        # Partitions up to date before the run (not committed by it) are checked now.
        futures = [
            self.partitions.pop((done.stage, r.partition), None) or self._submit(done.stage, r) for r in done.results
        ]
        self.stages.append((done, futures))

    def ready(
        self, wait: bool = False
    ) -> Iterator[Union[dg.MaterializeResult, dg.AssetMaterialization, dg.AssetCheckResult]]:
        """Materializations of the stages whose checks are done, in stage order. A stage of which
        some partitions failed is recorded per committed partition, each with its own numbers:
        Dagster attaches a MaterializeResult to every partition of the run, the failed ones too."""
        while self.stages and (wait or all(f.done() for f in self.stages[0][1])):
            done, futures = self.stages.popleft()
            key = stage_key(self.pipeline, done.stage)
            checked = checks.stage_results(
                self.pipeline, done.results, [f.result() for f in futures], self.names[done.stage], key
            )
            if not done.failed:
                yield dg.MaterializeResult(
                    asset_key=key,
                    metadata=metadata(done.results, done.usage, self.price_per_gpu_hour),
                    check_results=checked,
                )
                continue
            for result in done.results:
                yield dg.AssetMaterialization(
                    key,
                    partition=result.partition,
                    metadata=metadata([result]),
                    tags={dagster_data_version_tags()[0]: self.pipeline.code_version(done.stage)},
                )
            if done.results:
                yield from checked

    def _submit(self, stage: str, stats: PartitionStats) -> Future:
        return self.threads.submit(
            checks.partition_findings, self.pipeline, stage, stats, self.storage, self.names[stage]
        )


def stages_asset(pipeline: LLMPipeline, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    names = pipeline.stage_names()
    specs = [
        dg.AssetSpec(
            stage_key(pipeline, stage),
            deps=[
                stage_key(pipeline, pipeline.plan(stage).upstream)
                if pipeline.plan(stage).upstream
                else landing_key(pipeline)
            ],
            group_name=pipeline.name,
            description=STAGE_DESCRIPTIONS[stage],
            kinds={"ray", pipeline.engine.label.lower()} if stage == ENGINE else {"ray"},
            code_version=pipeline.code_version(stage),
            skippable=True,
        )
        for stage in names
    ]
    check_specs = [spec for stage in names for spec in checks.check_specs(pipeline, stage, stage_key(pipeline, stage))]

    @dg.multi_asset(
        name=f"{pipeline.name}_stages",
        specs=specs,
        check_specs=check_specs,
        partitions_def=partitions_def,
        can_subset=True,
        backfill_policy=dg.BackfillPolicy.single_run(),
        required_resource_keys={"storage", "ray_data", "engine_pool"},
        # Every run of these stages, whoever launched it, holds a slot of the GPU pool while it is
        # active (`granularity: run`, README "GPU limits"); pools are per op, so a subset without
        # the engine holds one too.
        pool=pipeline.gpu_pool if pipeline.engine.gpus_per_replica(True) else None,
    )
    def _stages(context: dg.AssetExecutionContext):
        dead_runs.record_process(context, pipeline.name)  # for the dead-runs sensor, should this process be killed
        try:
            yield from _run_stages(context)
        finally:
            dead_runs.clear_process(context, pipeline.name)

    def _run_stages(context: dg.AssetExecutionContext):
        selected = [stage for stage in names if stage_key(pipeline, stage) in context.selected_asset_keys]
        partitions = list(context.partition_keys)
        context.log.info(
            f"{pipeline.name}: stages {', '.join(selected)} over {len(partitions)} partition(s): "
            f"{', '.join(partitions[:10])}"
        )
        ray_data, store, engines = (
            context.resources.ray_data,
            context.resources.storage.store(),
            context.resources.engine_pool.engines(),
        )
        run = Run(
            pipeline,
            selected,
            partitions,
            store,
            engines,
            lambda: ray_data.session().start(context.log.info),
            log=context.log.info,
            recompute=context.run.tags.get(RECOMPUTE_TAG, "").lower() in ("1", "true", "yes"),
            stall_report_s=ray_data.stall_report_s,
        )
        # Checks read committed Parquet: in threads, so that the stream (and the engine it feeds)
        # never waits on them; results are reported in stage order.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="asset-checks") as threads:
            checking = _Checking(
                pipeline,
                store,
                set(context.selected_asset_check_keys),
                threads,
                engines.price_per_gpu_hour,
            )
            failure = None
            try:
                for event in run.run():
                    if isinstance(event, PartitionCommitted):
                        checking.committed(event.stage, event.stats)
                    elif isinstance(event, StageDone):
                        checking.stage_done(event)
                    yield from checking.ready()
            except Exception as exc:  # stages that committed everything before it are still reported
                failure = exc
            yield from checking.ready(wait=True)
            if failure is not None:
                raise failure

    return _stages
