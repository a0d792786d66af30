"""A sensor per pipeline: new and rewritten files in its landing location become runs.

Each tick lists the source (a local folder or an S3 prefix: file names and fingerprints, no file
is read), adds one dynamic partition per file not seen before (the partition key is the file's
path relative to the location, so the same file is never a second partition), records the
fingerprint of every file whose fingerprint changed as its partition's data version (an
observation of the landing asset, ``defs/landing.py``), and requests one run over all the
partitions that need one (a partition range: one engine start for the lot, not one per file):
the new ones, any added some other way (by hand, from the CLI) and never materialized, and the
materialized ones whose file was rewritten under the same name since their first stage ran (seen
by this tick, or observed since by "Observe sources"). That run recomputes the stages whose input
changed. The sensor's cursor keeps, for each partition requested and not yet materialized, the
fingerprint its file had then: a partition whose run failed (a bad file) is requested again only
once its file changes, never at every tick, while the good partitions of that run, committed, are
done. Each run key also holds the fingerprints of its files. What was seen lives in the Dagster
instance (the dynamic partitions, the observations, the cursor, run keys), so a restarted daemon
neither misses nor repeats a file.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg

from llm_assets.defs.assets import stage_key
from llm_assets.defs.landing import observations, observed_versions, stale_partitions, unobserved
from llm_assets.folder_partitions import partition_unit
from llm_assets.pipeline import LLMPipeline

# New partitions, and rewritten ones, requested per tick at most: a burst of files becomes several
# ticks of runs (rewritten ones left over stay stale, and are requested at a later tick).
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


def _run_key(pipeline: LLMPipeline, keys: list[str], fingerprints: dict[str, str]) -> str:
    """Names the partitions and their files' contents: the same request is made once."""
    if len(keys) == 1:
        return f"{pipeline.name}:{keys[0]}@{fingerprints.get(keys[0], 'missing')}"
    digest = hashlib.sha256(
        "\n".join(f"{key}@{fingerprints.get(key, 'missing')}" for key in keys).encode()
    ).hexdigest()[:16]
    return f"{pipeline.name}:{keys[0]}..{keys[-1]}@{digest}"


def new_files_sensor(pipeline: LLMPipeline, job, partitions_def: dg.DynamicPartitionsDefinition) -> dg.SensorDefinition:
    last_stage = stage_key(pipeline, pipeline.stage_names()[-1])
    unit = partition_unit(pipeline.source)

    @dg.sensor(
        name=f"{pipeline.name}_new_files",
        job=job,
        minimum_interval_seconds=pipeline.sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING
        if pipeline.sensor_running_by_default
        else dg.DefaultSensorStatus.STOPPED,
        description=f"Adds a partition for each new {unit} in {pipeline.source.location} "
        f"(pattern {pipeline.source.pattern!r}), records each {unit}'s fingerprint as its partition's data "
        f"version, and requests one run over every partition never materialized or whose {unit} was rewritten.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        instance = context.instance
        fingerprints = pipeline.source.fingerprints()
        known = list(instance.get_dynamic_partitions(pipeline.name))
        known_set = set(known)
        new = [key for key in fingerprints if key not in known_set][:MAX_NEW_PER_TICK]
        # Partitions added some other way (by hand, from the CLI) and never materialized run too.
        done = instance.get_materialized_partitions(last_stage)
        # Requested before at the same fingerprint and not materialized since: its run is queued,
        # running, or failed on that very file; a new version of the file is requested again.
        requested = {key: version for key, version in json.loads(context.cursor or "{}").items() if key not in done}
        waiting = {
            key for key in known if key not in done and key in fingerprints and requested.get(key) != fingerprints[key]
        }
        observed = observed_versions(instance, pipeline)
        changed = unobserved({key: fingerprints[key] for key in known + new if key in fingerprints}, observed)
        # Rewritten: seen changed now, or observed changed since the partition last ran. A partition
        # whose file is gone is left alone (a run could only fail).
        rewritten = sorted(
            key
            for key in {key for key in changed if key in observed} | stale_partitions(instance, pipeline, observed)
            if key in done and key in fingerprints
        )[:MAX_NEW_PER_TICK]
        events = observations(pipeline, changed)
        if not new and not waiting and not rewritten:
            failed = sorted(key for key in requested if key in fingerprints)
            missing = pipeline.source.missing()
            reason = (
                f"{missing}: create it, or fix the pipeline's source"
                if missing
                else f"no new files in {pipeline.source.location}, none rewritten"
            ) + (
                f"; {len(failed)} requested and not materialized, waiting for a new version of their file: "
                f"{', '.join(failed[:10])}"
                if failed
                else ""
            )
            return dg.SensorResult(
                asset_events=events, skip_reason=reason, cursor=json.dumps(requested, sort_keys=True)
            )
        if new:
            context.log.info(f"{len(new)} new file(s) in {pipeline.source.location}: {', '.join(new[:10])}")
        if rewritten:
            context.log.info(
                f"{len(rewritten)} file(s) rewritten since their partition ran: {', '.join(rewritten[:10])}"
            )
        # New partitions are added after every known one, in this order.
        order = known + new
        position = {key: index for index, key in enumerate(order)}
        requests = []
        for first, last in _ranges(order, waiting | set(new) | set(rewritten)):
            keys = order[position[first] : position[last] + 1]
            run_key = _run_key(pipeline, keys, fingerprints)
            requests.append(
                dg.RunRequest(run_key=run_key, partition_key=first)
                if first == last
                else dg.RunRequest(run_key=run_key, tags={RANGE_START: first, RANGE_END: last})
            )
        requested.update({key: fingerprints[key] for key in waiting | set(new) | set(rewritten) if key in fingerprints})
        return dg.SensorResult(
            run_requests=requests,
            asset_events=events,
            cursor=json.dumps(requested, sort_keys=True),
            dynamic_partitions_requests=[partitions_def.build_add_request(new)] if new else [],
        )

    return _sensor
