"""Dagster glue: a pipeline becomes its landing-files source (observable: a data version per
file, ``defs/landing.py``), its stages (one subsettable multi-asset, ``defs/assets.py``), the
optional OpenAI Batch export asset, a job and a sensor.

All of them share the pipeline's dynamic partitions (one per input file).
"""

from typing import Any, Sequence

import dagster as dg

from llm_assets import export
from llm_assets.defs.assets import RECOMPUTE_TAG, landing_key, stage_key, stages_asset
from llm_assets.defs.dead_runs import dead_runs_sensor
from llm_assets.defs.landing import landing_asset
from llm_assets.defs.sensors import new_files_sensor, new_partition_keys
from llm_assets.pipeline import LLMPipeline

__all__ = [
    "RECOMPUTE_TAG",
    "add_partitions_for_new_files",
    "build_definitions",
    "build_pipeline",
    "landing_key",
    "stage_key",
]


def _export_asset(pipeline: LLMPipeline, partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=stage_key(pipeline, export.EXPORT),
        deps=[stage_key(pipeline, pipeline.text_stage())],
        partitions_def=partitions_def,
        group_name=pipeline.name,
        backfill_policy=dg.BackfillPolicy.single_run(),
        required_resource_keys={"storage"},
        description=f"OpenAI Batch API output and error files per partition, under {pipeline.openai_batch_output}.",
        kinds={"openai"},
    )
    def _asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        results = export.export_partitions(
            pipeline, list(context.partition_keys), context.resources.storage.store(), context.log.info
        )
        metadata: dict[str, Any] = {key: sum(r[key] for r in results) for key in ("total", "completed", "failed")}
        if len(results) == 1:
            metadata["path"] = dg.MetadataValue.path(results[0]["path"])
        return dg.MaterializeResult(metadata=metadata)

    return _asset


def build_pipeline(pipeline: LLMPipeline) -> tuple[list, Any, list]:
    """The pipeline's assets, its job, and its sensors: the one that turns new and rewritten files
    into partitions and runs, and the one that fails its runs whose process died."""
    pipeline.check_model_paths()
    partitions_def = dg.DynamicPartitionsDefinition(name=pipeline.name)
    # Observable: each partition's data version is its file's fingerprint (a rewrite makes it stale).
    source = landing_asset(pipeline, partitions_def)
    assets = [stages_asset(pipeline, partitions_def)]
    if pipeline.openai_batch_output:
        assets.append(_export_asset(pipeline, partitions_def))
    job = dg.define_asset_job(
        name=f"{pipeline.name}_job",
        selection=dg.AssetSelection.assets(*assets),
        # The stages are one step anyway; in-process also keeps the export step in the run's process.
        executor_def=dg.in_process_executor,
        description=pipeline.description or f"Every stage of the {pipeline.name} pipeline.",
        tags=pipeline.extra_tags,
    )
    return [source, *assets], job, [new_files_sensor(pipeline, job, partitions_def), dead_runs_sensor(pipeline.name)]


def build_definitions(pipelines: Sequence[LLMPipeline], resources: dict[str, Any]) -> dg.Definitions:
    assets: list = []
    jobs: list = []
    sensors: list = []
    for pipeline in pipelines:
        pipeline_assets, job, pipeline_sensors = build_pipeline(pipeline)
        assets.extend(pipeline_assets)
        jobs.append(job)
        sensors.extend(pipeline_sensors)
    return dg.Definitions(assets=assets, jobs=jobs, sensors=sensors, resources=resources)


def add_partitions_for_new_files(instance: dg.DagsterInstance, pipeline: LLMPipeline) -> list[str]:
    """Register a dynamic partition for each source file not yet known; returns the new keys."""
    new = new_partition_keys(instance, pipeline)
    if new:
        instance.add_dynamic_partitions(pipeline.name, new)
    return new
