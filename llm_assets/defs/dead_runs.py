"""Runs whose process died end FAILURE within a sensor interval, whoever launched them.

Dagster's run monitoring notices a dead run worker only for runs its run launcher started, and only
while the code server that started it lives: a run executed by `dagster job execute` (the shell's
own process, the README's command) and killed stays STARTED until ``max_runtime_seconds`` (a day
with the shipped settings), and with one run at a time every queued run waits behind it; so does a
launched run whose code server died with it (`dagster dev` killed, then restarted). So a
pipeline's stages step records which process runs it (run tag ``llm_assets/<pipeline>.process``:
host, pid, and the process's start time, so a reused pid is not taken for it), and clears it when
the step ends. A sensor per pipeline, running by default, fails each STARTED run whose recorded
process on this machine is gone; the daemon's run queue then moves on. The run's local Ray and its engine
actors end with the process (Ray's own fate sharing with its driver).
"""

from __future__ import annotations

import os
import socket
from typing import Optional

import dagster as dg

ENDED = "ended"
CHECK_EVERY_S = 30


def _start_time(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot, from /proc), or None if there is no such
    process. Where /proc is missing, only whether the pid exists ("?")."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: it exists
        pass
    return "?"


def this_process() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}/{pid}/{_start_time(pid)}"


def process_gone(identity: str) -> Optional[bool]:
    """Whether the process a run recorded is gone; None when it ran on another machine (or the
    step ended normally)."""
    if identity == ENDED or identity.count("/") != 2:
        return None
    host, pid, started = identity.split("/")
    if host != socket.gethostname():
        return None
    now = _start_time(int(pid))
    return now is None or (started != "?" and now != "?" and now != started)


def process_tag(pipeline_name: str) -> str:
    return f"llm_assets/{pipeline_name}.process"


def record_process(context, pipeline_name: str) -> None:
    """Called as the stages' step starts: the run's process, for the sensor."""
    context.instance.add_run_tags(context.run.run_id, {process_tag(pipeline_name): this_process()})


def clear_process(context, pipeline_name: str) -> None:
    """Called as the step ends, however: the run's process may go on (other steps), or end normally."""
    context.instance.add_run_tags(context.run.run_id, {process_tag(pipeline_name): ENDED})


def dead_runs_sensor(pipeline_name: str) -> dg.SensorDefinition:
    tag = process_tag(pipeline_name)

    @dg.sensor(
        name=f"{pipeline_name}_dead_runs",
        minimum_interval_seconds=CHECK_EVERY_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Fails each STARTED run of the {pipeline_name} stages whose process on this machine is gone "
        "(killed, out of memory), whoever launched it, so that the run queue moves on.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        instance = context.instance
        started = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        failed = []
        for run in started:
            identity = run.tags.get(tag)
            if identity is None or not process_gone(identity):
                continue
            # Read again: Dagster's own monitoring may have failed it meanwhile.
            if instance.get_run_by_id(run.run_id).status != dg.DagsterRunStatus.STARTED:
                continue
            pid = identity.split("/")[1]
            instance.report_run_failed(
                run,
                f"The process that ran this run (pid {pid} on {socket.gethostname()}) is gone: "
                "killed or out of memory. Committed partitions are kept; a re-run computes the rest.",
            )
            failed.append(run.run_id)
        if not failed:
            return dg.SkipReason(f"{len(started)} run(s) STARTED, none whose process is gone")
        context.log.info(f"Marked {len(failed)} run(s) FAILED whose process is gone: {', '.join(failed)}")
        return dg.SkipReason(f"marked {len(failed)} run(s) FAILED whose process is gone")

    return _sensor
