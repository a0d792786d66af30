"""Dagster glue: a pipeline becomes one partitioned asset per stage, chained, plus a job.

All stage assets share the pipeline's dynamic partitions (one per input file). Each asset runs its
stage through :func:`llm_assets.runner.run_stage` for every partition its run targets; with the
single-run backfill policy, a backfill is one run, so the engine starts once for all partitions.
"""

import warnings
from typing import Any, Sequence

import dagster as dg

from llm_assets import checks, export
from llm_assets.pipeline import ENGINE, LLMPipeline
from llm_assets.runner import PartitionStats, run_stage
from llm_assets.sensors import new_files_sensor, new_partition_keys

# Run tag: recompute partitions even when their committed output is current.
RECOMPUTE_TAG = "llm_assets/recompute"

# The single-run backfill policy is what loads the engine once per backfill; Dagster flags it beta.
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=dg.BetaWarning)

STAGE_DESCRIPTIONS = {
    "preprocess": "Rows of the input file after the pipeline's preprocess function; each gets a stable row_id.",
    "chat_template": "`messages` rendered to a `prompt` with the model's chat template.",
    "tokenize": "`prompt` tokenized to `tokenized_prompt`.",
    ENGINE: "Generated tokens from the vLLM engine pool (`generated_tokens`, `num_input_tokens`, `num_generated_tokens`, `time_taken_llm`).",
    "detokenize": "`generated_tokens` decoded to `generated_text`.",
    "postprocess": "Rows after the pipeline's postprocess function: the pipeline's output.",
}


def landing_key(pipeline: LLMPipeline) -> dg.AssetKey:
    return dg.AssetKey([pipeline.name, "landing_files"])


def stage_key(pipeline: LLMPipeline, stage: str) -> dg.AssetKey:
    return dg.AssetKey([pipeline.name, stage])


def _metadata(results: list[PartitionStats]) -> dict[str, Any]:
    """Numeric metadata, so the asset page plots it across materializations. A multi-partition
    run (a backfill) records the run's totals on each of its partitions (Dagster attaches one
    result to all partitions of a run); each partition's own numbers are in its manifest."""
    seconds = max(sum(r.seconds for r in results), 1e-9)
    rows_out = sum(r.rows_out for r in results)
    generated = sum(r.generated_tokens for r in results)
    metadata: dict[str, Any] = {
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
    if any(r.rows_resumed for r in results):
        metadata["rows_resumed"] = sum(r.rows_resumed for r in results)
    if len(results) == 1:
        metadata["path"] = dg.MetadataValue.path(results[0].path)
    return metadata


def _stage_asset(pipeline: LLMPipeline, stage: str, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    plan = pipeline.plan(stage)
    upstream = stage_key(pipeline, plan.upstream) if plan.upstream else landing_key(pipeline)
    names = pipeline.stage_names()
    before_engine = names.index(stage) <= names.index(ENGINE)
    resource_keys = {"storage", "ray_data"} | ({"engine_pool"} if before_engine else set())

    @dg.asset(
        key=stage_key(pipeline, stage),
        deps=[upstream],
        partitions_def=partitions_def,
        group_name=pipeline.name,
        backfill_policy=dg.BackfillPolicy.single_run(),
        required_resource_keys=resource_keys,
        description=STAGE_DESCRIPTIONS[stage],
        kinds={"ray", "vllm"} if stage == ENGINE else {"ray"},
        code_version=pipeline.code_version(stage),
        check_specs=checks.check_specs(pipeline, stage, stage_key(pipeline, stage)),
    )
    def _asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        partitions = list(context.partition_keys)
        context.log.info(f"{pipeline.name}/{stage}: {len(partitions)} partition(s): {', '.join(partitions[:10])}")
        context.resources.ray_data.ensure_started()
        # Stages before the engine start it loading in the background, but only in a run that
        # will use it: rerunning CPU stages alone never touches the GPU.
        runs_engine = before_engine and stage_key(pipeline, ENGINE) in context.job_def.asset_layer.executable_asset_keys
        results = run_stage(
            pipeline,
            stage,
            partitions,
            storage=context.resources.storage,
            engine_pool=context.resources.engine_pool if runs_engine else None,
            log=context.log.info,
            recompute=context.run.tags.get(RECOMPUTE_TAG, "").lower() in ("1", "true", "yes"),
        )
        return dg.MaterializeResult(metadata=_metadata(results), check_results=_check_results(pipeline, stage, results, context.resources.storage))

    return _asset


def _check_results(pipeline: LLMPipeline, stage: str, results: list[PartitionStats], storage) -> list[dg.AssetCheckResult]:
    partitions = [r.partition for r in results]
    found = [checks.row_ids_conserved(pipeline, stage, partitions, storage, {r.partition: r.rows_in for r in results})]
    if stage == ENGINE:
        found.append(checks.error_rate(pipeline, sum(r.rows_out for r in results), sum(r.errors for r in results)))
    if stage == checks.text_stage(pipeline):
        found.append(checks.generations_not_empty(pipeline, stage, partitions, storage))
    return found


def _export_asset(pipeline: LLMPipeline, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=stage_key(pipeline, export.EXPORT),
        deps=[stage_key(pipeline, checks.text_stage(pipeline))],
        partitions_def=partitions_def,
        group_name=pipeline.name,
        backfill_policy=dg.BackfillPolicy.single_run(),
        required_resource_keys={"storage"},
        description=f"OpenAI Batch API output and error files per partition, under {pipeline.openai_batch_output}.",
        kinds={"openai"},
    )
    def _asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        results = export.export_partitions(pipeline, list(context.partition_keys), context.resources.storage, context.log.info)
        metadata: dict[str, Any] = {key: sum(r[key] for r in results) for key in ("total", "completed", "failed")}
        if len(results) == 1:
            metadata["path"] = dg.MetadataValue.path(results[0]["path"])
        return dg.MaterializeResult(metadata=metadata)

    return _asset


def build_pipeline(pipeline: LLMPipeline) -> tuple[list, Any, Any]:
    """The pipeline's assets (its landing-files source and one asset per stage), its job, and the
    sensor that turns new files into partitions and runs."""
    partitions_def = dg.DynamicPartitionsDefinition(name=pipeline.name)
    source = dg.AssetSpec(
        landing_key(pipeline),
        group_name=pipeline.name,
        description=f"Input files matching {pipeline.source.pattern!r} in {pipeline.source.location}; one partition per file.",
    )
    stages = [_stage_asset(pipeline, stage, partitions_def) for stage in pipeline.stage_names()]
    if pipeline.openai_batch_output:
        stages.append(_export_asset(pipeline, partitions_def))
    job = dg.define_asset_job(
        name=f"{pipeline.name}_job",
        selection=dg.AssetSelection.assets(*stages),
        # One process per run: Ray starts once and the engine pool lives across all stages.
        # Ray, not Dagster, spreads the work.
        executor_def=dg.in_process_executor,
        description=pipeline.description or f"Every stage of the {pipeline.name} pipeline.",
        tags=pipeline.extra_tags,
    )
    return [source, *stages], job, new_files_sensor(pipeline, job, partitions_def)


def build_definitions(pipelines: Sequence[LLMPipeline], resources: dict[str, Any]) -> dg.Definitions:
    assets: list = []
    jobs: list = []
    sensors: list = []
    for pipeline in pipelines:
        pipeline_assets, job, sensor = build_pipeline(pipeline)
        assets.extend(pipeline_assets)
        jobs.append(job)
        sensors.append(sensor)
    return dg.Definitions(assets=assets, jobs=jobs, sensors=sensors, resources=resources)


def add_partitions_for_new_files(instance: dg.DagsterInstance, pipeline: LLMPipeline) -> list[str]:
    """Register a dynamic partition for each source file not yet known; returns the new keys."""
    new = new_partition_keys(instance, pipeline)
    if new:
        instance.add_dynamic_partitions(pipeline.name, new)
    return new
