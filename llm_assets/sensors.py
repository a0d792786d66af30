"""A sensor per pipeline: new files in its landing location become partitions and runs.

Each tick lists the source (a local folder or an S3 prefix), adds one dynamic partition per file
not seen before (the partition key is the file's path relative to the location, so the same file
is never a second partition), and requests one run per new partition. What was seen lives in the
Dagster instance (the dynamic partitions themselves, and run keys), so a restarted daemon neither
misses nor repeats a file. A file rewritten under the same name is not reprocessed by the sensor;
re-run its partition (stages whose input changed recompute, see ``run_stage``).
"""

from __future__ import annotations

import dagster as dg

from llm_assets.pipeline import LLMPipeline

def new_partition_keys(instance: dg.DagsterInstance, pipeline: LLMPipeline) -> list[str]:
    """Keys of the source's files that are not yet partitions of the pipeline."""
    known = set(instance.get_dynamic_partitions(pipeline.name))
    return [key for key in pipeline.source.partition_keys() if key not in known]


# New partitions requested per tick, at most: a burst of files becomes several ticks of runs.
MAX_NEW_PER_TICK = 100


def new_files_sensor(pipeline: LLMPipeline, job, partitions_def: dg.DynamicPartitionsDefinition) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{pipeline.name}_new_files",
        job=job,
        minimum_interval_seconds=pipeline.sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING if pipeline.sensor_running_by_default else dg.DefaultSensorStatus.STOPPED,
        description=f"Adds a partition and requests a run for each new file in {pipeline.source.location} (pattern {pipeline.source.pattern!r}).",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        new = new_partition_keys(context.instance, pipeline)[:MAX_NEW_PER_TICK]
        if not new:
            return dg.SkipReason(f"no new files in {pipeline.source.location}")
        context.log.info(f"{len(new)} new file(s) in {pipeline.source.location}: {', '.join(new[:10])}")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"{pipeline.name}:{key}", partition_key=key) for key in new],
            dynamic_partitions_requests=[partitions_def.build_add_request(new)],
        )

    return _sensor
