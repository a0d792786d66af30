"""The landing files as an observable source asset: one partition per file, whose data version is
the file's fingerprint (a local file's size and modification time, an S3 object's ETag).

A rewritten file gets a new data version for its partition only, once it is observed (by the
new-files sensor, each tick, or "Observe sources" in the UI). Dagster then shows that partition's
first stage stale ("has a new dependency data version"): a stage materialization records the
storage id of the landing observations it ran after (``dagster/input_event_pointer/...``), and
Dagster compares the partition's version at that point with its newest one. Only versions that
changed are recorded, so observing 1 000 unchanged files writes nothing.

What Dagster 1.13 does not do here: it records a meaningless ``input_data_version`` for a
partitioned observable dependency (the hash of nothing; dagster-io/dagster#33988), so the first
stage's own data version does not change with its file, and the stages after it are not shown
stale by a rewrite (they are recomputed by the run all the same: their inputs changed).
"""

from __future__ import annotations

import warnings
from typing import Mapping

import dagster as dg

from llm_assets.defs.assets import landing_key, stage_key
from llm_assets.folder_partitions import partition_unit
from llm_assets.pipeline import LLMPipeline
from llm_assets.private_apis import dagster_data_provenance, dagster_data_version, dagster_data_version_tags

_, DATA_VERSION_TAG = dagster_data_version_tags()

# The only Dagster API that observes versions per partition (multi_observable_source_asset cannot:
# dagster-io/dagster#32653); Dagster flags it beta.
warnings.filterwarnings(
    "ignore", message=".*(observable_source_asset|DataVersionsByPartition).*", category=dg.BetaWarning
)


def landing_asset(pipeline: LLMPipeline, partitions_def: dg.DynamicPartitionsDefinition) -> dg.SourceAsset:
    unit = partition_unit(pipeline.source)

    @dg.observable_source_asset(
        key=landing_key(pipeline),
        partitions_def=partitions_def,
        group_name=pipeline.name,
        description=f"Input files matching {pipeline.source.pattern!r} in {pipeline.source.location}; "
        f"one partition per {unit}. Data version: the {unit}'s fingerprint, so a {unit} rewritten under the "
        "same name makes its partition's stages stale.",
    )
    def _observe(context) -> dg.DataVersionsByPartition:
        # Files that are not partitions yet are the sensor's to add (and observe).
        known = set(context.instance.get_dynamic_partitions(pipeline.name))
        current = {key: version for key, version in pipeline.source.fingerprints().items() if key in known}
        changed = unobserved(current, observed_versions(context.instance, pipeline))
        context.log.info(
            f"{len(current)} file(s) in {pipeline.source.location}; {len(changed)} with a new version: "
            f"{', '.join(list(changed)[:10])}"
        )
        return dg.DataVersionsByPartition(changed)

    return _observe


def observed_versions(instance: dg.DagsterInstance, pipeline: LLMPipeline) -> dict[str, str]:
    """Partition -> the data version of its newest observation (one query for all partitions)."""
    tags = instance.event_log_storage.get_latest_tags_by_partition(
        landing_key(pipeline), dg.DagsterEventType.ASSET_OBSERVATION, [DATA_VERSION_TAG]
    )
    return {partition: found[DATA_VERSION_TAG] for partition, found in tags.items() if DATA_VERSION_TAG in found}


def unobserved(fingerprints: Mapping[str, str], observed: Mapping[str, str]) -> dict[str, str]:
    """The fingerprints that differ from the partition's last observed version (or were never observed)."""
    return {key: version for key, version in fingerprints.items() if observed.get(key) != version}


def observations(pipeline: LLMPipeline, versions: Mapping[str, str]) -> list[dg.AssetObservation]:
    """What an observation run records, for a sensor to report."""
    return [
        dg.AssetObservation(asset_key=landing_key(pipeline), partition=key, tags={DATA_VERSION_TAG: version})
        for key, version in versions.items()
    ]


def stale_partitions(instance: dg.DagsterInstance, pipeline: LLMPipeline, observed: Mapping[str, str]) -> set[str]:
    """Partitions whose file was observed with another version after their first stage last
    materialized: those Dagster shows stale ("has a new dependency data version"), by Dagster's
    own rule. Two queries over all partitions, then two per partition observed since its last
    materialization (normally none: the sensor observes a change before it requests the run).
    Not seen here, though Dagster may show it: a file observed from the UI while its run was
    under way (the run may have read either version)."""
    landing = landing_key(pipeline)
    first_stage = stage_key(pipeline, pipeline.stage_names()[0])
    newest_observation = instance.get_latest_storage_id_by_partition(landing, dg.DagsterEventType.ASSET_OBSERVATION)
    last_materialization = instance.get_latest_storage_id_by_partition(
        first_stage, dg.DagsterEventType.ASSET_MATERIALIZATION
    )
    stale = set()
    for partition, materialized in last_materialization.items():
        if newest_observation.get(partition, 0) <= materialized:
            continue
        record = instance.get_latest_data_version_record(first_stage, False, partition)
        provenance = dagster_data_provenance(record.event_log_entry) if record is not None else None
        # The newest landing observation (of any partition) when that run's step started; None:
        # there was none, and Dagster then compares nothing either.
        pointer = provenance.input_storage_ids.get(landing) if provenance is not None else None
        if pointer is None:
            continue
        then = instance.get_latest_data_version_record(landing, True, partition, before_cursor=pointer + 1)
        version_then = dagster_data_version(then.event_log_entry) if then is not None else None
        if (version_then.value if version_then else None) != observed.get(partition):
            stale.add(partition)
    return stale
