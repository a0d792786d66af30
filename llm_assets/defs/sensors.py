"""A sensor per pipeline: new files in its landing location become partitions and one run.

Each tick lists the source (a local folder or an S3 prefix), adds one dynamic partition per file
not seen before (the partition key is the file's path relative to the location, so the same file
is never a second partition), and requests one run over all the new partitions (a partition range:
one engine start for the lot, not one per file), together with any partition that was added some
other way (by hand, from the CLI) and never materialized. What was seen lives in the Dagster instance (the
dynamic partitions themselves, and run keys), so a restarted daemon neither misses nor repeats a
file. A file rewritten under the same name is not reprocessed by the sensor; re-run its partition
(stages whose input changed recompute).
"""

from __future__ import annotations

import dagster as dg

from llm_assets.defs.assets import stage_key
from llm_assets.pipeline import LLMPipeline

# New partitions requested per tick, at most: a burst of files becomes several ticks of runs.
MAX_NEW_PER_TICK = 100
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def new_partition_keys(instance: dg.DagsterInstance, pipeline: LLMPipeline) -> list[str]:
    """Keys of the source's files that are not yet partitions of the pipeline."""
    known = set(instance.get_dynamic_partitions(pipeline.name))
    return [key for key in pipeline.source.partition_keys() if key not in known]


def _ranges(keys: list[str], wanted: set[str]) -> list[tuple[str, str]]:
    """The wanted keys as contiguous (first, last) ranges in the partitions' order."""
    ranges: list[list[str]] = []
    previous_wanted = False
    for key in keys:
        if key in wanted:
            if previous_wanted:
                ranges[-1][1] = key
            else:
                ranges.append([key, key])
        previous_wanted = key in wanted
    return [(first, last) for first, last in ranges]


def new_files_sensor(pipeline: LLMPipeline, job, partitions_def: dg.DynamicPartitionsDefinition) -> dg.SensorDefinition:
    last_stage = stage_key(pipeline, pipeline.stage_names()[-1])

    @dg.sensor(
        name=f"{pipeline.name}_new_files",
        job=job,
        minimum_interval_seconds=pipeline.sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING if pipeline.sensor_running_by_default else dg.DefaultSensorStatus.STOPPED,
        description=f"Adds a partition for each new file in {pipeline.source.location} (pattern {pipeline.source.pattern!r}) "
        "and requests one run over every partition never materialized.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        new = new_partition_keys(context.instance, pipeline)[:MAX_NEW_PER_TICK]
        # Partitions added some other way (by hand, from the CLI) and never materialized run too.
        known = list(context.instance.get_dynamic_partitions(pipeline.name))
        done = context.instance.get_materialized_partitions(last_stage)
        waiting = {key for key in known if key not in done}
        if not new and not waiting:
            return dg.SkipReason(f"no new files in {pipeline.source.location}")
        if new:
            context.log.info(f"{len(new)} new file(s) in {pipeline.source.location}: {', '.join(new[:10])}")
        # New partitions are added after every known one, in this order; a run key per range, so a
        # range whose run failed is not requested again until its set of partitions changes.
        requests = [
            dg.RunRequest(run_key=f"{pipeline.name}:{first}", partition_key=first)
            if first == last
            else dg.RunRequest(run_key=f"{pipeline.name}:{first}..{last}", tags={RANGE_START: first, RANGE_END: last})
            for first, last in _ranges(known + new, waiting | set(new))
        ]
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=[partitions_def.build_add_request(new)] if new else [])

    return _sensor
