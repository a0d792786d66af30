"""Faults during real runs: an engine actor killed mid-partition (SIGKILL of its process)."""

import os
import re
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.data import questions, write_jsonl
from tests.helpers.pipelines import engine_starts, fake_pipeline, log_messages, make_pipeline, make_resources, run_job

ROWS = 128
# Long enough that the engine is still generating when the killer strikes (the whole partition
# takes a few seconds on 2 cores).
MAX_TOKENS = 384


def long_answers(row):
    return {
        "question": row["question"],
        "messages": [{"role": "user", "content": row["question"]}],
        "sampling_params": {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0},
    }


def kill_engine_once_generating(instance, killed: dict) -> None:
    """Waits for the run's first engine to be ready, lets it generate for a moment, then kills
    its actor process with SIGKILL (what an OOM killer or a lost node does)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        runs = instance.get_runs(limit=1)
        if runs:
            for message in log_messages(instance, runs[0].run_id):
                found = re.search(r"vLLM engine 0 started in .* \(pid (\d+) ", message)
                if found:
                    time.sleep(0.3)
                    killed["pid"] = int(found.group(1))
                    os.kill(killed["pid"], signal.SIGKILL)
                    return
        time.sleep(0.2)


@pytest.mark.slow  # a kill test (about 35 s on 2 cores): the slow tier, with the other kill tests
def test_an_engine_killed_mid_partition_is_replaced_and_every_row_comes_out_once(
    tmp_path, tiny_model, ray_session, instance
):
    write_jsonl(tmp_path / "landing" / "x.jsonl", questions(ROWS, "k"))
    pipeline = make_pipeline(tmp_path / "landing", tiny_model, preprocess=long_answers, batch_size=8)
    resources = make_resources(tmp_path / "storage")
    killed: dict = {}
    killer = threading.Thread(target=kill_engine_once_generating, args=(instance, killed), daemon=True)
    killer.start()
    result = run_job(pipeline, resources, instance, {"dagster/partition": "x.jsonl"})
    killer.join(timeout=5)

    assert result.success and killed.get("pid")
    messages = log_messages(instance, result.run_id)
    assert any(m.startswith("vLLM engine 0 died") for m in messages)
    assert engine_starts(instance, result.run_id) == 2  # the first, and its replacement
    files = resources["storage"].store().committed_files("tiny", "engine", "x.jsonl")
    engine = pa.concat_tables(pq.read_table(f) for f in files)
    row_ids = engine.column("row_id").to_pylist()
    print(
        f"rows in {ROWS}, rows out {len(row_ids)}, duplicates {len(row_ids) - len(set(row_ids))}, "
        f"lost {ROWS - len(set(row_ids))}"
    )
    assert sorted(row_ids) == sorted(f"x.jsonl:{i}" for i in range(ROWS))
    assert set(engine.column("num_generated_tokens").to_pylist()) == {MAX_TOKENS}


def test_an_engine_that_does_not_start_in_time_fails_the_run_saying_so(tmp_path, fake_model, ray_session, instance):
    write_jsonl(tmp_path / "landing" / "x.jsonl", questions(4, "t"))
    pipeline = fake_pipeline(tmp_path / "landing", fake_model, start_delay_s=30)
    resources = make_resources(tmp_path / "storage", start_timeout_s=0.5)
    # The CPU stages first, in a run of their own (no engine): the failing run then starts from them.
    tags = {"dagster/partition": "x.jsonl"}
    assert run_job(pipeline, resources, instance, tags, stages=["preprocess", "chat_template", "tokenize"]).success
    result = run_job(pipeline, resources, instance, tags, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.step_failure_data.error
    assert "EngineStartError: Fake engines for" in (error.cause or error).message.splitlines()[0]
    assert "did not start within" in error.to_string()
    assert resources["storage"].store().manifest("tiny", "tokenize", "x.jsonl").rows == 4  # what was committed stays


@pytest.mark.parametrize(
    "engine_kwargs, expected",
    [
        (
            {"max_model_lenn": 512},
            "TypeError: EngineArgs.__init__() got an unexpected keyword argument 'max_model_lenn'",
        ),
        pytest.param(  # the same path as the first with another refusal: the slow tier keeps it
            {"max_model_len": 100000},
            "User-specified max_model_len (100000) is greater than the derived max_model_len",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_an_engine_setting_vllm_refuses_fails_the_run_with_vllms_reason(
    tmp_path, tiny_model, ray_session, instance, engine_kwargs, expected
):
    """vLLM checks its settings as the engine builds: the run's error is the first thing a user
    reads, so it carries vLLM's words (the lines after a pydantic error's first name the setting)."""
    write_jsonl(tmp_path / "landing" / "x.jsonl", questions(4, "e"))
    pipeline = make_pipeline(tmp_path / "landing", tiny_model, engine_kwargs=engine_kwargs)
    result = run_job(
        pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "x.jsonl"}, raise_on_error=False
    )
    assert not result.success
    error = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error
    headline = (error.cause or error).message.splitlines()[0]
    assert headline.startswith("llm_assets.execution.engine_stage.EngineStartError: vLLM engine 0 failed to start: ")
    assert expected in headline
    assert not (tmp_path / "storage" / "tiny" / "engine").exists()


@pytest.mark.parametrize(
    "settings, expected",
    [
        (
            {"tokenize_stage": {"num_cpus": 4}},
            "stage(s) tokenize ask for 4 logical CPU(s) per worker; the largest node of the Ray cluster has 4, "
            "1 of them held by the engines",
        ),
        ({"concurrency": 5}, "the engines ask for 5 logical CPU(s) in all; the Ray cluster has 4"),
        # Each setting fits alone; together the actors Ray Data starts at once (and keeps to the run's
        # end) cannot all be placed: the rows would wait forever for the operator left without one.
        (
            {"concurrency": 2, "tokenize_stage": {"batch_size": 17}, "detokenize_stage": {"concurrency": (2, 3)}},
            "its engines and the smallest pools of its stages' actors, which Ray Data starts at once and keeps "
            "for the whole run, need 4.5 of the Ray cluster's 4 logical CPU(s) (engines 2, "
            "MapBatches(preprocess+chat_template) 0.5, MapBatches(tokenize) 0.5, MapBatches(engine_output+detokenize) "
            "1, MapBatches(postprocess) 0.5)",
        ),
    ],
)
def test_a_run_the_cluster_can_never_schedule_fails_at_once_naming_the_resource(
    tmp_path, fake_model, ray_session, instance, settings, expected
):
    write_jsonl(tmp_path / "landing" / "x.jsonl", questions(2, "s"))
    pipeline = fake_pipeline(tmp_path / "landing", fake_model, **settings)
    started = time.monotonic()
    result = run_job(
        pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "x.jsonl"}, raise_on_error=False
    )
    assert not result.success and time.monotonic() - started < 60
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.step_failure_data.error
    assert expected in (error.cause or error).message.splitlines()[0]
    # Ray's CPUs are logical: the message says where the number comes from.
    assert "a local Ray has max(4, cores) of them" in (error.cause or error).message


@pytest.mark.parametrize(
    "settings",
    [
        {"concurrency": 3},  # 3 engines + 2 operators of 0.5
        pytest.param(  # the same fill, of split operators: the slow tier keeps it
            {"concurrency": 2, "tokenize_stage": {"batch_size": 17}, "detokenize_stage": {"concurrency": (1, 3)}},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_engines_and_actor_pools_that_fill_the_cluster_still_read_and_finish(
    tmp_path, fake_model, ray_session, instance, settings
):
    """The engines and the smallest actor pools hold all 4 of the cluster's CPUs for the whole run:
    the reads, which reserve none, still run, and every row of both partitions comes out."""
    for name, rows in (("x", 9), ("y", 30)):
        write_jsonl(tmp_path / "landing" / f"{name}.jsonl", questions(rows, name))
    pipeline = fake_pipeline(tmp_path / "landing", fake_model, **settings)
    resources = make_resources(tmp_path / "storage")
    tags = {"dagster/asset_partition_range_start": "x.jsonl", "dagster/asset_partition_range_end": "y.jsonl"}
    assert run_job(pipeline, resources, instance, tags).success
    store = resources["storage"].store()
    for partition, rows in (("x.jsonl", 9), ("y.jsonl", 30)):
        assert store.manifest("tiny", "postprocess", partition).rows == rows


def test_a_run_waiting_on_a_busy_cluster_says_what_it_waits_for_and_goes_on_when_it_frees(
    tmp_path, fake_model, ray_session, instance
):
    """Another job holds every CPU of the cluster: the run's engine cannot be placed and its first
    task cannot run. The run reports that from Ray's state instead of hanging silently, and
    finishes once the CPUs are free."""
    import ray

    from llm_assets.resources import RayDataResource

    @ray.remote(num_cpus=4)
    class OtherJob:
        def ping(self) -> bool:
            return True

    other = OtherJob.remote()
    ray.get(other.ping.remote())  # placed: it holds all 4 CPUs now
    write_jsonl(tmp_path / "landing" / "x.jsonl", questions(3, "b"))
    pipeline = fake_pipeline(tmp_path / "landing", fake_model)
    resources = make_resources(tmp_path / "storage")
    resources["ray_data"] = RayDataResource(stall_report_s=2)
    resources["engine_pool"] = resources["engine_pool"].model_copy(update={"ray_data": resources["ray_data"]})
    outcome: dict = {}
    runner = threading.Thread(
        target=lambda: outcome.update(result=run_job(pipeline, resources, instance, {"dagster/partition": "x.jsonl"}))
    )
    runner.start()
    report = None
    deadline = time.monotonic() + 120
    while report is None and time.monotonic() < deadline:
        runs = instance.get_runs(limit=1)
        report = next(
            (m for m in (log_messages(instance, runs[0].run_id) if runs else []) if "no batch finished for" in m), None
        )
        time.sleep(0.5)
    ray.kill(other)  # the other job ends
    runner.join(timeout=600)
    assert report is not None, "no stall report within 120 s"
    print(report)
    assert "free in the Ray cluster: 0 of 4 CPU(s)" in report
    assert "1 Fake engine actor(s) not placed by Ray yet: each needs 1 CPU" in report
    # Ray Data's own state of each operator: the first group's actor waits for a CPU too.
    assert "Ray Data MapBatches(preprocess+chat_template+tokenize): 0 task(s) running" in report
    assert "actors 0 running, 1 pending" in report
    assert outcome["result"].success
    assert resources["storage"].store().manifest("tiny", "postprocess", "x.jsonl").rows == 3
