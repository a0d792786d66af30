"""Runs killed from outside end FAILED, with the instance settings the README's commands use
(`.dagster_home/dagster.yaml`) and a real `dagster-daemon run`, as `dagster dev` runs it.

Two ways a run loses its process, one daemon session each, on the tiny model:

1. The run worker is SIGKILLed (what the OOM killer does) while Dagster lives. The code server that
   started the worker sees it gone and fails the run, naming the signal; the engine actor and the
   run's local Ray (gcs_server, raylet, workers) exit by themselves with it, all but Ray's two agents,
   which take about 75 s more.
2. Dagster's machine is lost with the run: the daemon, its code server, the run worker and its Ray
   are SIGKILLed together. Nothing is left that knows the run. If its stages step had begun, it had
   recorded its process, and the pipeline's dead-runs sensor fails it at the new daemon's first
   tick; if not, it stays STARTED until the new daemon's run monitoring (enabled in that
   dagster.yaml) finds it past its maximum runtime (the run's `dagster/max_runtime` tag here, the
   instance's `max_runtime_seconds` otherwise) and fails it. Which of the two depends on how busy
   the machine was when it was killed.

The second run is submitted with the first and waits in the queue (`max_concurrent_runs: 1`) until
the first has failed: a killed run frees its slot.
"""

from __future__ import annotations

import os
import re
import signal
import time

import dagster as dg
import psutil
import pytest

from llm_assets.defs.dead_runs import process_tag
from tests.helpers.deployment import INSTANCE_SETTINGS, Deployment, messages, open_instance
from tests.helpers.processes import alive, describe, kill_processes, name, wait_for

# The second run's limit: longer than the test takes to see it STARTED once the first is killed; a
# shorter limit cancelled it unseen.
MAX_RUNTIME_S = 45
# Ray's dashboard and runtime-env agents outlive their raylet by about 75 s on this machine (they
# block reporting its death to the GCS, which died with it) and then exit; measured, not waited for.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def poll_every_second(settings: dict) -> None:
    """The only change to the shipped settings: the daemon looks every second, not every 30."""
    settings["run_monitoring"]["poll_interval_seconds"] = 1


@pytest.fixture()
def deployment(tmp_path, tiny_model):
    deployment = Deployment(tmp_path, tiny_model, files={"a.jsonl": 3}, adjust=poll_every_second)
    yield deployment
    deployment.teardown()


def test_the_shipped_instance_settings_enable_run_monitoring_for_the_default_launcher(tmp_path):
    """What `dagster dev` with DAGSTER_HOME=.dagster_home loads: the monitoring daemon runs, with
    settings the default run launcher accepts (it cannot resume runs: max_resume_run_attempts 0)."""
    (tmp_path / "dagster.yaml").write_text(INSTANCE_SETTINGS.read_text())
    with open_instance(tmp_path) as instance:
        assert instance.run_monitoring_enabled
        assert "MONITORING" in instance.get_required_daemon_types()
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        assert not instance.run_launcher.supports_resume_run
        assert instance.run_monitoring_max_resume_run_attempts == 0
        assert instance.run_monitoring_max_runtime_seconds > 0  # a run left STARTED ends some day
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 1


def test_killed_runs_end_failed_saying_why(deployment):
    t0 = time.monotonic()
    marks = {}
    mark = lambda what: marks.__setitem__(what, round(time.monotonic() - t0, 1))  # noqa: E731
    with open_instance(deployment.home) as instance:
        instance.add_dynamic_partitions("tiny", ["a.jsonl"])
        # Both runs are queued before the daemon starts, so the first one is dequeued first and the
        # second still waits when the first is killed, however slow the machine.
        deployment.launch({"dagster/partition": "a.jsonl"})
        deployment.launch({"dagster/partition": "a.jsonl", "dagster/max_runtime": str(MAX_RUNTIME_S)})
        mark("launched")
        second, first = instance.get_runs()  # newest first
        assert "dagster/max_runtime" not in first.tags and second.tags["dagster/max_runtime"] == str(MAX_RUNTIME_S)
        assert {first.status, second.status} == {dg.DagsterRunStatus.QUEUED}
        first_daemon = deployment.start_daemon()

        def explain(run_id):
            return lambda: "\n".join(messages(instance, run_id)[-30:]) + "\n" + deployment.daemon_logs()

        # 1. The run worker is SIGKILLed once its engine actor is up.
        def worker_pid(run_id):
            found = [re.search(r"Started process for run \(pid: (\d+)\)", m) for m in messages(instance, run_id)]
            return next((int(f.group(1)) for f in found if f), None)

        def started(run_id):
            return instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED

        # The worker logs its pid just before it marks the run STARTED.
        wait_for(lambda: started(first.run_id), 120, "the first run STARTED", explain(first.run_id))
        pid = worker_pid(first.run_id)
        mark("worker")
        assert pid in [p.pid for p in deployment.tree(first_daemon.pid)]  # launched by the daemon's code server

        def engine_started():
            return [p for p in deployment.tree(pid) if name(p).startswith("ray::") and "Engine" in name(p)]

        wait_for(engine_started, 120, "the first run's engine actor process", explain(first.run_id))
        assert instance.get_run_by_id(second.run_id).status == dg.DagsterRunStatus.QUEUED  # one run at a time
        mark("engine")
        run_processes = deployment.tree(pid)[1:]
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)

        def failed(run_id):
            return instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE

        wait_for(lambda: failed(first.run_id), 30, "the killed run FAILURE", explain(first.run_id))
        detected_s = time.monotonic() - killed_at
        mark("failed")
        log = messages(instance, first.run_id)
        assert f"Run execution process for {first.run_id} was terminated by signal 9 (SIGKILL)." in "\n".join(log), log[
            -10:
        ]

        # Everything the run started goes with it: its Ray (gcs_server, raylet, workers) and the
        # engine. Checked at the end: in a full suite an idle Ray worker (ray::IDLE) was still alive
        # 30 s after the kill, and waiting longer here would hold up the second run past its
        # maximum runtime.
        def survivors():
            return [p for p in alive(run_processes) if name(p) not in RAY_AGENTS]

        # 2. The second run, dequeued now that the slot is free, is lost with the whole deployment.
        wait_for(
            lambda: started(second.run_id),
            60,
            "the queued run STARTED once the killed one freed its slot",
            explain(second.run_id),
        )
        mark("second started")
        deployment_processes = deployment.tree(first_daemon.pid)
        second_pid = worker_pid(second.run_id)
        assert second_pid in [p.pid for p in deployment_processes]
        kill_processes(deployment_processes)
        assert first_daemon.poll() is not None and not psutil.pid_exists(second_pid)
        time.sleep(3)  # nothing that is left notices
        assert started(second.run_id)

        # Whether its stages step had begun (and recorded its process for the dead-runs sensor)
        # when it was killed depends on how busy the machine was: that decides who fails it.
        recorded = instance.get_run_by_id(second.run_id).tags.get(process_tag("tiny"))
        deployment.start_daemon()  # Dagster restarted
        start_time = instance.get_run_record_by_id(second.run_id).start_time
        wait_for(lambda: failed(second.run_id), MAX_RUNTIME_S + 60, "the lost run FAILURE", explain(second.run_id))
        mark("second failed")
        failed_after_s = instance.get_run_record_by_id(second.run_id).end_time - start_time
        log = messages(instance, second.run_id)
        if recorded is None:  # only Dagster's run monitoring can tell, at the run's maximum runtime
            assert f"Canceling due to exceeding maximum runtime of {MAX_RUNTIME_S} seconds." in log, log[-10:]
            assert any(m.startswith("This job is being forcibly marked as failed.") for m in log), log[-10:]
            assert failed_after_s >= MAX_RUNTIME_S
        else:  # the pipeline's dead-runs sensor finds the recorded process gone, at its first tick
            pid = recorded.split("/")[1]
            assert any(m.startswith(f"The process that ran this run (pid {pid} on ") for m in log), log[-10:]
        wait_for(lambda: not survivors(), 30, "the killed run's processes exit", lambda: describe(survivors()))
        mark("killed run's processes gone")

    print(
        f"timeline (s): {marks}; killed worker -> FAILURE in {detected_s:.1f} s; "
        f"lost run FAILURE {failed_after_s:.1f} s after its start"
    )


def test_a_killed_dagster_job_execute_run_ends_failed_and_the_queue_moves(deployment):
    """`dagster job execute` runs in the shell's own process: SIGKILLed, nothing of Dagster's
    notices, and with one run at a time every queued run would wait behind it for a day. The
    pipeline's dead-runs sensor (running by default, every 30 s) fails it; the queued run starts."""
    with open_instance(deployment.home) as instance:
        instance.add_dynamic_partitions("tiny", ["a.jsonl"])
        deployment.start_daemon()
        command = deployment.execute({"dagster/partition": "a.jsonl"})
        run = wait_for(lambda: instance.get_runs(), 120, "the command's run", deployment.daemon_logs)[0]

        def engine_started():
            return [p for p in deployment.tree(command.pid) if name(p).startswith("ray::") and "Engine" in name(p)]

        wait_for(
            engine_started,
            180,
            "the command's engine actor process",
            lambda: (deployment.tmp / "execute-0.log").read_text()[-3000:],
        )
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        deployment.launch({"dagster/partition": "a.jsonl"})  # queued behind it: one run at a time
        queued = next(r for r in instance.get_runs() if r.run_id != run.run_id)
        time.sleep(5)
        assert instance.get_run_by_id(queued.run_id).status == dg.DagsterRunStatus.QUEUED

        run_processes = deployment.tree(command.pid)[1:]
        killed_at = time.monotonic()
        os.kill(command.pid, signal.SIGKILL)
        command.wait()

        def status(run_id):
            return instance.get_run_by_id(run_id).status

        wait_for(
            lambda: status(run.run_id) == dg.DagsterRunStatus.FAILURE,
            120,
            "the killed command's run FAILURE",
            lambda: "\n".join(messages(instance, run.run_id)[-20:]) + deployment.daemon_logs(),
        )
        detected_s = time.monotonic() - killed_at
        log = "\n".join(messages(instance, run.run_id))
        assert f"The process that ran this run (pid {command.pid} on " in log and "is gone" in log, log[-2000:]
        # Its Ray and engine actors ended with the process.
        wait_for(
            lambda: not [p for p in alive(run_processes) if name(p) not in RAY_AGENTS],
            60,
            "the killed run's processes exit",
            lambda: describe(alive(run_processes)),
        )
        wait_for(
            lambda: status(queued.run_id) in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS),
            60,
            "the queued run starting once the dead one freed its slot",
            deployment.daemon_logs,
        )
        wait_for(
            lambda: status(queued.run_id) == dg.DagsterRunStatus.SUCCESS,
            240,
            "the queued run to succeed",
            lambda: "\n".join(messages(instance, queued.run_id)[-20:]),
        )
    print(f"killed dagster job execute -> FAILURE in {detected_s:.1f} s")
