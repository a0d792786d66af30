"""The new-files sensor under a real `dagster-daemon run` (as `dagster dev` runs it), with the
shipped instance settings: files landed together, some of them bad."""

from __future__ import annotations

import json
import time

import dagster as dg
import pytest

from tests.helpers.data import questions, write_jsonl
from tests.helpers.deployment import Deployment, definitions, messages, open_instance
from tests.helpers.processes import wait_for

SENSOR_INTERVAL_S = 2
# On the fake engine: what is tested is which runs the sensor asks for and what they commit.
DEFINITIONS = definitions(
    f"sensed(fake_pipeline(landing, model), {SENSOR_INTERVAL_S})",
    "from tests.helpers.pipelines import fake_pipeline, sensed",
)

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def sensor_ticks(instance: dg.DagsterInstance) -> list:
    state = next(s for s in instance.all_instigator_state() if s.instigator_name == "tiny_new_files")
    return instance.get_ticks(state.instigator_origin_id, state.selector_id)


def test_one_bad_file_never_blocks_the_good_ones(tmp_path, fake_model):
    """Three files land at once (one empty, one with a bad line, one good): the sensor's one run
    commits the good one and fails naming both bad files; later ticks request nothing until a bad
    file changes, and then only that file."""
    deployment = Deployment(tmp_path, fake_model, DEFINITIONS)
    landing = tmp_path / "landing"
    (landing / "a-empty.jsonl").write_text("")
    (landing / "b-badline.jsonl").write_text(json.dumps({"question": "fine"}) + "\n{not json\n")
    write_jsonl(landing / "c-good.jsonl", questions(3, "c"))
    try:
        with open_instance(deployment.home) as instance:
            deployment.start_daemon()

            def runs():
                return instance.get_runs()

            def finished(run):
                return instance.get_run_by_id(run.run_id).status in (
                    dg.DagsterRunStatus.SUCCESS,
                    dg.DagsterRunStatus.FAILURE,
                )

            first = wait_for(lambda: runs()[-1:], 120, "the sensor's run", deployment.daemon_logs)[0]
            assert (
                first.tags["dagster/asset_partition_range_start"],
                first.tags["dagster/asset_partition_range_end"],
            ) == ("a-empty.jsonl", "c-good.jsonl")
            wait_for(
                lambda: finished(first),
                300,
                "the sensor's run to end",
                lambda: "\n".join(messages(instance, first.run_id)[-30:]),
            )
            assert instance.get_run_by_id(first.run_id).status == dg.DagsterRunStatus.FAILURE
            for stage in ("preprocess", "engine", "postprocess"):
                assert instance.get_materialized_partitions(dg.AssetKey(["tiny", stage])) == {"c-good.jsonl"}, stage
            failure = next(
                r.dagster_event
                for r in instance.all_logs(first.run_id)
                if r.is_dagster_event and r.dagster_event.is_step_failure
            )
            cause = str(failure.step_failure_data.error.cause)
            assert "2 of 3 partition(s) failed (the other 1 committed every stage)" in cause
            assert "[a-empty.jsonl] " in cause and "a-empty.jsonl has no rows" in cause
            assert (
                "[b-badline.jsonl] " in cause
                and "b-badline.jsonl: line 2 (row 'b-badline.jsonl:1'): invalid JSON" in cause
            )

            # Ticks after it request nothing: the good file is done, the bad ones wait for a new version.
            ticks_before = len(sensor_ticks(instance))
            wait_for(
                lambda: len(sensor_ticks(instance)) >= ticks_before + 3,
                60,
                "three more sensor ticks",
                deployment.daemon_logs,
            )
            assert len(runs()) == 1
            skipped = next(t for t in sensor_ticks(instance) if t.status.value == "SKIPPED")
            assert "waiting for a new version of their file: a-empty.jsonl, b-badline.jsonl" in (
                skipped.skip_reason or ""
            ), skipped

            # The bad line fixed: a run of that file alone, which succeeds.
            time.sleep(0.01)  # a new modification time, whatever the clock's resolution
            write_jsonl(landing / "b-badline.jsonl", questions(2, "b"))
            second = wait_for(
                lambda: [r for r in runs() if r.run_id != first.run_id],
                60,
                "a run for the fixed file",
                deployment.daemon_logs,
            )[0]
            assert second.tags.get("dagster/partition") == "b-badline.jsonl"
            wait_for(
                lambda: finished(second),
                300,
                "the fixed file's run to end",
                lambda: "\n".join(messages(instance, second.run_id)[-30:]),
            )
            assert instance.get_run_by_id(second.run_id).status == dg.DagsterRunStatus.SUCCESS
            assert instance.get_materialized_partitions(dg.AssetKey(["tiny", "postprocess"])) == {
                "b-badline.jsonl",
                "c-good.jsonl",
            }
            assert len(runs()) == 2
    finally:
        deployment.teardown()
