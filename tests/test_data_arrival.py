"""Data arrival through real Dagster runs on the fake engine: the new-files sensor, backfills that
load the engine once and leave committed partitions alone, stale stages after a code change,
asset checks."""

import os

import dagster as dg
import pytest
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._time import get_current_datetime

from llm_assets.defs.factory import add_partitions_for_new_files, build_definitions, stage_key
from tests.helpers.data import questions, write_jsonl
from tests.helpers.pipelines import (
    RANGE_END,
    RANGE_START,
    engine_starts,
    fake_pipeline,
    log_messages,
    make_resources,
    run_job,
    tick,
    to_chat,
)


@pytest.fixture(scope="module")
def arrival(tmp_path_factory, fake_model, ray_session):
    root = tmp_path_factory.mktemp("arrival")
    landing = root / "landing"
    landing.mkdir()
    pipeline = fake_pipeline(landing, fake_model)
    resources = make_resources(root / "storage")
    with dg.instance_for_test() as instance:
        yield {
            "root": root,
            "landing": landing,
            "pipeline": pipeline,
            "resources": resources,
            "instance": instance,
            "model": fake_model,
        }


def test_a_landed_file_becomes_a_partition_and_a_run_and_is_never_seen_twice(arrival):
    pipeline, instance, resources = arrival["pipeline"], arrival["instance"], arrival["resources"]
    defs = build_definitions([pipeline], resources)
    assert tick(defs, instance).skip_message.startswith("no new files")

    write_jsonl(arrival["landing"] / "day-1.jsonl", questions(3, "d1"))
    data = tick(defs, instance)
    assert [r.partition_key for r in data.run_requests] == ["day-1.jsonl"]
    assert instance.get_dynamic_partitions("tiny") == ["day-1.jsonl"]

    run = data.run_requests[0]
    result = defs.resolve_job_def("tiny_job").execute_in_process(
        instance=instance, partition_key=run.partition_key, tags=run.tags
    )
    assert result.success
    rows = dg.AssetKey(["tiny", "postprocess"])
    assert instance.get_latest_materialization_event(rows).asset_materialization.metadata["rows_out"].value == 3

    # The same file dropped again (same bytes, same times), seen after a "restart" (new
    # definitions, new context): no new partition, no run.
    path = arrival["landing"] / "day-1.jsonl"
    stat = path.stat()
    write_jsonl(path, questions(3, "d1"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = tick(build_definitions([fake_pipeline(arrival["landing"], arrival["model"])], resources), instance)
    assert not again.run_requests and "no new files" in again.skip_message
    assert instance.get_dynamic_partitions("tiny") == ["day-1.jsonl"]


def test_a_backfill_of_five_partitions_starts_the_engine_once_and_a_rerun_recomputes_nothing(arrival):
    pipeline, instance, resources = arrival["pipeline"], arrival["instance"], arrival["resources"]
    for day in range(2, 6):
        write_jsonl(arrival["landing"] / f"day-{day}.jsonl", questions(2 + day, f"d{day}"))
    defs = build_definitions([pipeline], resources)
    requests = tick(defs, instance).run_requests
    assert len(requests) == 1  # one run over the four new files: one engine start, not four
    assert (requests[0].tags[RANGE_START], requests[0].tags[RANGE_END]) == ("day-2.jsonl", "day-5.jsonl")
    keys = instance.get_dynamic_partitions("tiny")
    assert keys == [f"day-{d}.jsonl" for d in range(1, 6)]
    storage = resources["storage"].store()
    day1_engine = storage.manifest("tiny", "engine", "day-1.jsonl")

    job = defs.resolve_job_def("tiny_job")
    backfill = job.execute_in_process(instance=instance, tags={RANGE_START: keys[0], RANGE_END: keys[-1]})
    assert backfill.success
    messages = log_messages(instance, backfill.run_id)
    assert engine_starts(instance, backfill.run_id) == 1
    # day-1 was committed by the sensor's run with the same code and input: left untouched.
    assert any("engine [day-1.jsonl]: up to date" in m for m in messages)
    assert storage.manifest("tiny", "engine", "day-1.jsonl").attempt == day1_engine.attempt
    for done, key in enumerate(keys[1:], start=1):  # per-partition progress in the log
        assert any(f"engine [{key}]: committed" in m and "/4 partitions)" in m for m in messages)
    for key, rows in zip(keys, [3, 4, 5, 6, 7]):
        assert storage.manifest("tiny", "postprocess", key).rows == rows
    evaluations = [e for e in backfill.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert evaluations and all(e.event_specific_data.passed for e in evaluations)
    assert {e.event_specific_data.check_name for e in evaluations} == {
        "row_ids_conserved",
        "error_rate",
        "generations_not_empty",
    }

    attempts = {
        (stage, key): storage.manifest("tiny", stage, key).attempt for stage in pipeline.stage_names() for key in keys
    }
    rerun = job.execute_in_process(instance=instance, tags={RANGE_START: keys[0], RANGE_END: keys[-1]})
    assert rerun.success
    assert engine_starts(instance, rerun.run_id) == 0
    assert {(s, k): storage.manifest("tiny", s, k).attempt for s, k in attempts} == attempts


def materialized_day(tmp_path, model, instance) -> tuple:
    """A pipeline, its resources, and its partition day-1.jsonl materialized by one run."""
    write_jsonl(tmp_path / "landing" / "day-1.jsonl", questions(3, "d1"))
    pipeline, resources = fake_pipeline(tmp_path / "landing", model), make_resources(tmp_path / "storage")
    assert run_job(pipeline, resources, instance, {"dagster/partition": "day-1.jsonl"}).success
    return pipeline, resources


def test_a_partition_added_by_hand_is_run_by_the_sensor_and_a_materialized_one_is_not(
    tmp_path, fake_model, ray_session, instance
):
    pipeline, resources = materialized_day(tmp_path, fake_model, instance)
    write_jsonl(tmp_path / "landing" / "manual.jsonl", questions(2, "m"))
    assert add_partitions_for_new_files(instance, pipeline) == ["manual.jsonl"]  # what the CLI does
    defs = build_definitions([pipeline], resources)
    data = tick(defs, instance)
    fingerprint = pipeline.source.fingerprint("manual.jsonl")
    assert [(r.partition_key, r.run_key) for r in data.run_requests] == [
        ("manual.jsonl", f"tiny:manual.jsonl@{fingerprint}")
    ]


def test_code_versions_mark_exactly_the_changed_stage_and_its_downstream_stale(
    tmp_path, fake_model, ray_session, instance
):
    _, resources = materialized_day(tmp_path, fake_model, instance)
    landing, model = tmp_path / "landing", fake_model

    def stale(pipeline) -> dict[str, StaleStatus]:
        graph = build_definitions([pipeline], resources).resolve_asset_graph()
        view = AssetGraphView(
            temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
            instance=instance,
            asset_graph=graph,
        )
        resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
        return {s: resolver.get_status(stage_key(pipeline, s), "day-1.jsonl") for s in pipeline.stage_names()}

    assert set(stale(fake_pipeline(landing, model)).values()) == {StaleStatus.FRESH}

    def new_answer(row):
        return {"question": row["question"], "answer": row["generated_text"].upper()}

    after_postprocess_change = stale(fake_pipeline(landing, model, postprocess=new_answer))
    assert [s for s, status in after_postprocess_change.items() if status == StaleStatus.STALE] == ["postprocess"]

    def longer(row):
        chat = to_chat(row)
        chat["sampling_params"] = {**chat["sampling_params"], "max_tokens": 16}
        return chat

    after_params_change = stale(fake_pipeline(landing, model, preprocess=longer))
    assert all(status == StaleStatus.STALE for status in after_params_change.values())


def test_the_error_rate_check_fails_when_too_many_rows_fail(tmp_path, fake_model, ray_session, instance):
    write_jsonl(tmp_path / "landing" / "x.jsonl", [{"question": "fine"}, {"question": "word " * 600}])
    pipeline = fake_pipeline(tmp_path / "landing", fake_model, should_continue_on_error=True)
    defs = build_definitions([pipeline], make_resources(tmp_path / "storage"))
    instance.add_dynamic_partitions("tiny", ["x.jsonl"])
    result = defs.resolve_job_def("tiny_job").execute_in_process(instance=instance, partition_key="x.jsonl")
    assert result.success  # a failed check warns in the UI; it does not fail the run
    checks = {
        e.event_specific_data.check_name: e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert not checks["error_rate"].passed
    assert checks["error_rate"].metadata["error_rate"].value == 0.5
    assert checks["row_ids_conserved"].passed
    engine = instance.get_latest_materialization_event(dg.AssetKey(["tiny", "engine"])).asset_materialization
    assert engine.metadata["errors"].value == 1


def test_the_sensor_groups_waiting_partitions_into_contiguous_ranges():
    from llm_assets.defs.sensors import _ranges

    keys = ["a", "b", "c", "d", "e"]
    assert _ranges(keys, {"a", "b", "d"}) == [("a", "b"), ("d", "d")]
    assert _ranges(keys, set()) == []
    assert _ranges(keys, set(keys)) == [("a", "e")]
