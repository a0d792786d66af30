"""GPU limits: every run of a pipeline's stages holds a slot of its Dagster concurrency pool
(`LLMPipeline.gpu_pool`, "llm_assets/gpu" by default) while it is active, so the instance's limit
on the pool caps the engine pools built at once, whoever launched the runs.

1. Definitions and settings: the pool is on the stages op (Dagster pools are per op), `gpu_pool`
   names it or turns it off, an engine that holds no GPU of the run (an HTTP endpoint) takes none,
   every run of the stages counts (a subset without the engine too: the one op is the one step),
   and the shipped `.dagster_home/dagster.yaml` counts slots per run with a default limit of 1.
2. The limit at work, on CPU with the tiny model: two runs of different partitions queued at once
   (`dagster job launch`, as the UI queues them) on an instance with room for two runs but a pool
   limit of 1 (`dagster instance concurrency set`), a real `dagster-daemon run`. The daemon starts
   the first; the second stays QUEUED while the first is active (the daemon's log names the pool)
   and builds its engine only after the first run has ended (its stages step and its engine's
   shutdown, which comes after the step); both succeed, and the second computed its own partition
   with its own engine (nothing taken over from the first).
"""

from __future__ import annotations

import time

import dagster as dg
import pyarrow.parquet as pq
import pytest
from dagster._core.instance.config import PoolGranularity

from llm_assets.defs.factory import build_definitions, stage_key
from llm_assets.engines.http import HttpRequestProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from llm_assets.storage import PartitionStore
from tests.helpers.data import questions
from tests.helpers.deployment import INSTANCE_SETTINGS, Deployment, open_instance
from tests.helpers.pipelines import make_pipeline, make_resources

POOL = "llm_assets/gpu"
STEP = "tiny_stages"
ROWS = {"a.jsonl": 3, "b.jsonl": 4}
ENGINE_LOAD = ": 1 engine actor(s) ("
ENGINE_START = "vLLM engine 0 started in"
ENGINE_DOWN = "vLLM engine 0 shut down"

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def stages_pool(pipeline: LLMPipeline):
    defs = build_definitions([pipeline], make_resources("unused"))
    return defs.resolve_assets_def(stage_key(pipeline, "engine")).op.pool


def test_the_stages_op_holds_the_pipelines_gpu_pool_and_the_shipped_settings_limit_it_to_one(tmp_path, tiny_model):
    folder = tmp_path / "landing"
    assert stages_pool(make_pipeline(folder, tiny_model)) == POOL  # the default, shared by pipelines
    assert (
        stages_pool(LLMPipeline("tiny", {"model_source": tiny_model}, LocalFolderSource(str(folder)), gpu_pool="h100s"))
        == "h100s"
    )
    assert (
        stages_pool(LLMPipeline("tiny", {"model_source": tiny_model}, LocalFolderSource(str(folder)), gpu_pool=None))
        is None
    )
    http = HttpRequestProcessorConfig(url="http://127.0.0.1:9/v1/chat/completions")
    assert (
        stages_pool(LLMPipeline("tiny", http, LocalFolderSource(str(folder)), gpu_pool="h100s")) is None
    )  # no GPU of ours

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dagster.yaml").write_text(INSTANCE_SETTINGS.read_text())
    with open_instance(tmp_path / "home") as instance:
        settings = instance.get_concurrency_config()
        assert settings.pool_config.default_pool_limit == 1  # a pool with no limit of its own: one slot
        # `run` granularity: the queue daemon holds a run whose pool is full QUEUED and counts a run's
        # slot while the run is active, so a run that ends in any way frees it.
        assert settings.pool_config.pool_granularity == PoolGranularity.RUN
        assert settings.run_queue_config.should_block_op_concurrency_limited_runs
        assert settings.run_queue_config.max_concurrent_runs == 1  # the run monitoring settings' queue, kept
        # Every run of the stages counts, whatever it selects: the stages are one op, pools are per op.
        pipeline = make_pipeline(folder, tiny_model)
        job = build_definitions([pipeline], make_resources(tmp_path / "storage")).resolve_job_def("tiny_job")
        for stage in ("engine", "postprocess"):
            run = instance.create_run_for_job(job, asset_selection={stage_key(pipeline, stage)})
            assert run.run_op_concurrency.all_pools == {POOL}, stage


def room_for_two_runs(settings: dict) -> None:
    """Room for both runs, so that only the GPU pool can hold one back; the queue looked at every second."""
    settings["concurrency"]["runs"]["max_concurrent_runs"] = 2
    settings["run_queue"] = {"dequeue_interval_seconds": 1}


@pytest.fixture()
def deployment(tmp_path, tiny_model):
    deployment = Deployment(tmp_path, tiny_model, files=ROWS, adjust=room_for_two_runs)
    yield deployment
    deployment.teardown()


def events(instance, run_id, event_type: str) -> list:
    return [
        r for r in instance.all_logs(run_id) if r.is_dagster_event and r.dagster_event.event_type_value == event_type
    ]


def logged_at(instance, run_id, text: str) -> float:
    found = [r.timestamp for r in instance.all_logs(run_id) if text in (r.user_message or "")]
    assert found, f"{run_id}: no log line with {text!r}"
    return found[0]


def engine_metadata(instance, run_id) -> dict:
    [materialization] = [
        r.dagster_event.event_specific_data.materialization
        for r in events(instance, run_id, "ASSET_MATERIALIZATION")
        if r.dagster_event.asset_key == dg.AssetKey(["tiny", "engine"])
    ]
    return {key: value.value for key, value in materialization.metadata.items()}


def test_with_a_pool_limit_of_one_the_second_run_builds_its_engine_after_the_first_runs_step_ended(deployment):
    t0 = time.monotonic()
    with open_instance(deployment.home) as instance:
        instance.add_dynamic_partitions("tiny", list(ROWS))
        # The README's step: the pool's limit set once on the instance. (default_limit alone reaches a
        # pool only after the queue daemon's first pass that sees it: the runs dequeued in that very
        # pass are not held. Measured here: both runs of this burst started.)
        deployment.dagster("instance", "concurrency", "set", POOL, "1")
        # Both queued before the daemon starts: a burst, as two sensor ticks or two backfills make.
        for partition in ROWS:
            deployment.launch({"dagster/partition": partition})
        second, first = instance.get_runs()  # newest first
        assert first.tags["dagster/partition"] == "a.jsonl" and second.tags["dagster/partition"] == "b.jsonl"
        # Dagster counted both against the pool when it created them (from the stages step's op).
        assert first.run_op_concurrency.all_pools == second.run_op_concurrency.all_pools == {POOL}
        launched_s = time.monotonic() - t0
        deployment.start_daemon()

        def status(run):
            return instance.get_run_by_id(run.run_id).status

        def explain():
            lines = [
                f"{name}: {status(run)} "
                + " | ".join((r.user_message or "")[:200] for r in instance.all_logs(run.run_id)[-15:])
                for name, run in (("first", first), ("second", second))
            ]
            return "\n".join(lines) + "\n" + deployment.daemon_logs()

        # While the first run is active, the second stays QUEUED (read before the first's status, so
        # that the first was still active when it was read).
        second_while_first_active, limits = [], set()
        deadline = time.monotonic() + 240
        while True:
            second_status, first_status = status(second), status(first)
            if first_status in (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED):
                second_while_first_active.append(second_status)
                limits.add(instance.event_log_storage.get_concurrency_info(POOL).slot_count)
            if all(
                s in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE) for s in (first_status, second_status)
            ):
                break
            assert time.monotonic() < deadline, "both runs done: not within 240 s\n" + explain()
            time.sleep(0.5)
        done_s = time.monotonic() - t0 - launched_s

        for run in (first, second):
            assert status(run) == dg.DagsterRunStatus.SUCCESS, explain()
        assert second_while_first_active and set(second_while_first_active) == {dg.DagsterRunStatus.QUEUED}, (
            second_while_first_active
        )
        assert limits == {1}
        # Held by the pool, as the daemon's log says (not by max_concurrent_runs: there was room for two).
        assert f'Run {second.run_id} is blocked by global concurrency limits: {{"{POOL}"' in deployment.daemon_logs(
            tail=None
        ), explain()
        assert f"Run {first.run_id} is blocked" not in deployment.daemon_logs(tail=None)

        # The engines never overlapped: the second run's step, and so its engine, started after the first
        # run had ended, its stages step and its engine's shutdown (at the run's resource teardown,
        # after the step) included.
        [first_step_end] = [
            r.timestamp for r in events(instance, first.run_id, "STEP_SUCCESS") if r.dagster_event.step_key == STEP
        ]
        first_end = instance.get_run_record_by_id(first.run_id).end_time
        [second_start] = [
            r.timestamp for r in events(instance, second.run_id, "STEP_START") if r.dagster_event.step_key == STEP
        ]
        assert first_step_end <= first_end and logged_at(instance, first.run_id, ENGINE_DOWN) <= first_end
        assert (
            first_end
            <= second_start
            <= logged_at(instance, second.run_id, ENGINE_LOAD)
            < logged_at(instance, second.run_id, ENGINE_START)
        )

        # The second run computed its own partition with its own engine: nothing reused from the first.
        storage = PartitionStore(root=str(deployment.tmp / "storage"))
        for run, partition in ((first, "a.jsonl"), (second, "b.jsonl")):
            metadata = engine_metadata(instance, run.run_id)
            assert metadata["partitions_recomputed"] == 1 and metadata["rows_out"] == ROWS[partition], metadata
            assert "rows_cached" not in metadata and "rows_resumed" not in metadata, metadata
            rows = pq.read_table(storage.committed_files("tiny", "postprocess", partition)).to_pylist()
            assert sorted(r["question"] for r in rows) == sorted(
                q["question"] for q in questions(ROWS[partition], partition[0])
            )
            assert all(r["answer"] for r in rows)
        assert storage.manifest("tiny", "engine", "b.jsonl").committed_at > first_end

        created = instance.get_run_record_by_id(second.run_id).create_timestamp.timestamp()
        print(
            f"both launched in {launched_s:.1f} s, both done {done_s:.1f} s after the daemon started; "
            f"the second run's step started {second_start - created:.1f} s after it was queued, "
            f"{second_start - first_end:.1f} s after the first run ended"
        )
