"""Runs launched the ways a user launches them, on the tiny model: each runs the selected stages in
ONE step (`tiny_stages`: one process, one Ray, one engine pool) and starts the engine once.

- `dagster asset materialize -f DEFS --select group:tiny --partition a.jsonl`: the implicit asset
  job with Dagster's default multiprocess executor, as the UI's "Materialize" runs it;
- an asset backfill of two partitions launched as the asset page does (GraphQL
  `launchPartitionBackfill` with `assetSelection` and `partitionNames`), driven as `dagster dev`'s
  daemon drives it: the backfill daemon's iteration, then the run queue daemon's, then the default
  run launcher (`dagster api execute_run` from the code server). With the single-run backfill
  policy that is one run over both partitions.

Both use a real instance in a temporary DAGSTER_HOME and a definitions file in tmp_path, with
the pipeline of tests/test_pipeline_dagster.py (its pre/postprocess functions importable by Ray
workers through PYTHONPATH).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import psutil
import pyarrow.parquet as pq
import pytest

from llm_assets.resources import PartitionStorage
from llm_assets.storage import PartitionStore
from tests.helpers.data import questions, write_jsonl
from tests.helpers.deployment import code_location_env
from tests.helpers.processes import kill_processes, new_descendants

PROJECT = Path(__file__).resolve().parent.parent
STAGES = ["preprocess", "chat_template", "tokenize", "engine", "detokenize", "postprocess"]
ROWS = {"a.jsonl": 3, "b.jsonl": 4}
ENGINE_START = "vLLM engine 0 started in"
ENGINE_LOAD = ": 1 engine actor(s) ("
RUN_WAIT_S = 420

DEFINITIONS = textwrap.dedent(
    """\
    import os

    from llm_assets.defs.factory import build_definitions
    from llm_assets.resources import PartitionStorage, make_resources
    from tests.helpers.pipelines import make_pipeline

    PIPELINES = [make_pipeline(os.environ["LAUNCH_PATHS_LANDING"], os.environ["LAUNCH_PATHS_MODEL"])]
    defs = build_definitions(PIPELINES, make_resources(PartitionStorage(root=os.environ["LAUNCH_PATHS_STORAGE"])))
    """
)

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture()
def setup(tmp_path, tiny_model):
    """Landing files a.jsonl and b.jsonl, the definitions file, the environment its processes need."""
    for name, n in ROWS.items():
        write_jsonl(tmp_path / "landing" / name, questions(n, name[0]))
    defs_file = tmp_path / "launch_defs.py"
    defs_file.write_text(DEFINITIONS)
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = code_location_env(home, "LAUNCH_PATHS", tmp_path / "landing", tmp_path / "storage", tiny_model)
    return {
        "tmp": tmp_path,
        "defs": defs_file,
        "home": home,
        "env": env,
        "storage": PartitionStore(root=str(tmp_path / "storage")),
    }


@pytest.fixture()
def reaper():
    """Kills, by PID, what the test started under the pytest process and left running."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    kill_processes(new_descendants(before), timeout_s=10)


def assert_one_step_one_engine(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The run succeeded, ran exactly one step (tiny_stages) and started one engine; returns its log."""
    run = instance.get_run_by_id(run_id)
    records = instance.all_logs(run_id)
    messages = [r.user_message for r in records]
    assert run.status == dg.DagsterRunStatus.SUCCESS, "\n".join(messages[-40:])
    steps = [
        r.dagster_event.step_key
        for r in records
        if r.is_dagster_event and r.dagster_event.event_type_value == "STEP_START"
    ]
    assert steps == ["tiny_stages"], steps
    starts = [m for m in messages if ENGINE_START in m]
    assert len(starts) == 1, starts
    loads = [m for m in messages if ENGINE_LOAD in m]
    assert len(loads) == 1, loads
    return messages


def assert_committed(storage: PartitionStorage, partitions: list[str]) -> None:
    for partition in partitions:
        rows = pq.read_table(storage.committed_files("tiny", "postprocess", partition)).to_pylist()
        assert sorted(r["row_id"] for r in rows) == sorted(f"{partition}:{i}" for i in range(ROWS[partition])), (
            partition
        )
        assert all(isinstance(r["answer"], str) for r in rows)


def test_dagster_asset_materialize_runs_the_stages_in_one_step_with_one_engine(setup, reaper):
    """`dagster asset materialize --select group:tiny --partition a.jsonl`: the implicit asset job,
    multiprocess executor; one run, one step, one engine start; a.jsonl committed, b.jsonl untouched."""
    env = {**os.environ, **setup["env"]}
    with dg.instance_for_test(temp_dir=str(setup["home"])) as instance:
        instance.add_dynamic_partitions("tiny", sorted(ROWS))
    dagster = Path(sys.executable).parent / "dagster"
    materialize = [str(dagster), "asset", "materialize", "-f", str(setup["defs"])]
    materialize += ["--select", "group:tiny", "--partition", "a.jsonl"]
    process = subprocess.Popen(
        materialize,
        cwd=setup["tmp"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=RUN_WAIT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert process.returncode == 0, output[-6000:]
    assert "RUN_SUCCESS" in output
    assert output.count(ENGINE_START) >= 1  # the CLI prints the run's events
    assert "Started a local Ray for this run: 4 logical CPU(s)" in output

    with dg.instance_for_test(temp_dir=str(setup["home"])) as instance:
        runs = instance.get_runs()
        assert len(runs) == 1, [r.run_id for r in runs]
        run = runs[0]
        assert run.job_name.startswith("__ASSET_JOB"), run.job_name
        assert run.tags.get("dagster/partition") == "a.jsonl"
        messages = assert_one_step_one_engine(instance, run.run_id)
        assert any("multiprocess executor" in m for m in messages), "not the default multiprocess executor"
        assert any(
            "stages preprocess, chat_template, tokenize, engine, detokenize, postprocess over 1 partition(s): a.jsonl"
            in m
            for m in messages
        )
    assert_committed(setup["storage"], ["a.jsonl"])
    assert setup["storage"].manifest("tiny", "postprocess", "b.jsonl") is None

    # The same command again: every stage is up to date, so the run starts no Ray at all.
    again = subprocess.run(
        materialize,
        cwd=setup["tmp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_WAIT_S,
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    output = again.stdout + again.stderr
    assert all(f"{stage} [a.jsonl]: up to date" in output for stage in STAGES), output[-6000:]
    assert "Started a local Ray" not in output and ENGINE_LOAD not in output, output[-6000:]


LAUNCH_PARTITION_BACKFILL = """
mutation($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on PythonError { message stack }
    ... on PartitionKeysNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}
"""


def test_asset_backfill_from_the_asset_page_is_one_run_one_step_one_engine(setup, reaper, monkeypatch):
    """launchPartitionBackfill (assetSelection = the six stages, partitionNames a.jsonl, b.jsonl),
    run by the backfill and run-queue daemons' iterations and the default run launcher: one run
    for both partitions, one step, one engine start, both partitions committed."""
    from dagster._core.execution.backfill import BulkActionStatus
    from dagster._core.storage.tags import (
        ASSET_PARTITION_RANGE_END_TAG,
        ASSET_PARTITION_RANGE_START_TAG,
        BACKFILL_ID_TAG,
    )
    from dagster._daemon.backfill import execute_backfill_iteration
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
    from dagster_graphql.test.utils import define_out_of_process_workspace, execute_dagster_graphql

    for key, value in setup["env"].items():  # the code server and the runs it launches inherit these
        monkeypatch.setenv(key, value)
    logger = logging.getLogger("test_launch_paths")

    with dg.instance_for_test(temp_dir=str(setup["home"])) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"  # as `dagster dev`
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        instance.add_dynamic_partitions("tiny", sorted(ROWS))
        with define_out_of_process_workspace(str(setup["defs"]), "defs", instance) as workspace:
            result = execute_dagster_graphql(
                workspace.create_request_context(),
                LAUNCH_PARTITION_BACKFILL,
                {
                    "backfillParams": {
                        "assetSelection": [{"path": ["tiny", stage]} for stage in STAGES],
                        "partitionNames": sorted(ROWS),
                        "fromFailure": False,
                        "tags": [],
                    }
                },
            )
            assert not result.errors, result.errors
            launched = result.data["launchPartitionBackfill"]
            assert launched["__typename"] == "LaunchBackfillSuccess", launched
            backfill_id = launched["backfillId"]
            backfill_runs = dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id})

            def daemons_tick() -> None:
                for error in execute_backfill_iteration(workspace, logger):
                    assert error is None, error
                with QueuedRunCoordinatorDaemon(interval_seconds=1) as queue:
                    for error in queue.run_iteration(workspace):
                        assert error is None, error

            deadline = time.monotonic() + 120
            while not instance.get_runs(backfill_runs):
                assert time.monotonic() < deadline, (
                    f"the backfill launched no run: {instance.get_backfill(backfill_id)}"
                )
                daemons_tick()
            deadline = time.monotonic() + RUN_WAIT_S
            while True:
                runs = instance.get_runs(backfill_runs)
                if all(r.is_finished for r in runs):
                    break
                assert time.monotonic() < deadline, f"runs still going: {[(r.run_id, r.status) for r in runs]}"
                daemons_tick()  # as the daemons keep ticking; a second run would be launched here
                time.sleep(2)
            # Tick until the backfill is complete: it must not ask for any further run.
            for _ in range(10):
                if instance.get_backfill(backfill_id).status != BulkActionStatus.REQUESTED:
                    break
                daemons_tick()
            runs = instance.get_runs(backfill_runs)
            backfill = instance.get_backfill(backfill_id)

        assert len(runs) == 1, [(r.run_id, r.tags) for r in runs]
        run = runs[0]
        assert run.job_name.startswith("__ASSET_JOB"), run.job_name
        assert (run.tags.get(ASSET_PARTITION_RANGE_START_TAG), run.tags.get(ASSET_PARTITION_RANGE_END_TAG)) == (
            "a.jsonl",
            "b.jsonl",
        ), run.tags
        messages = assert_one_step_one_engine(instance, run.run_id)
        assert any("over 2 partition(s): a.jsonl, b.jsonl" in m for m in messages)
        assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS, backfill.status
        for stage in STAGES:
            assert instance.get_materialized_partitions(dg.AssetKey(["tiny", stage])) == set(ROWS), stage
    assert_committed(setup["storage"], sorted(ROWS))
