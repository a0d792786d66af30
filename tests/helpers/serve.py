"""A Ray cluster that outlives runs, for the Ray Serve engine's tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llm_assets.resources import PartitionStorage, RayDataResource, make_resources
from tests.helpers.local_ray import init_local_ray
from tests.helpers.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def ray_cluster(temp_dir):
    """A Ray cluster that outlives the runs. This process connects to it as a run's process does;
    a Ray this process had started (other test modules' session) is shut down meanwhile and
    started again afterwards with the same settings (conftest's ray_session)."""
    import ray

    had_session_ray = ray.is_initialized()
    if had_session_ray:
        ray.shutdown()
    port = free_port()
    # Workers import the tests' functions. Ray's token authentication as this process has it: a
    # process that used a Ray with one auth mode and then connects to a cluster with another gets
    # actors that die before they start (measured with Ray 2.60). A local Ray started in this
    # process sets RAY_AUTH_MODE=token here; before that it is unset, which a driver takes as disabled.
    # Where packages live on PYTHONPATH (the GPU machine's, installed with --target), they stay on it.
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or "disabled"}
    head = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=4",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.init(address=address, namespace="llm_assets_tests")
            break
        except ConnectionError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(1)
    try:
        yield address
    finally:
        _stop(head, had_session_ray)


def resources_on(cluster, storage: Path) -> dict:
    return make_resources(PartitionStorage(root=str(storage)), RayDataResource(address=cluster))


def timeline(instance, run_id, marks: tuple[str, ...]) -> list[tuple[float, str]]:
    """Seconds from the run's start to each log line that contains one of ``marks``."""
    events = instance.all_logs(run_id)
    start = events[0].timestamp  # the run's first event (an in-process run records no RUN_START)
    return [
        (round(e.timestamp - start, 2), e.user_message[:160])
        for e in events
        if e.user_message and any(mark in e.user_message for mark in marks)
    ]


def _stop(head, had_session_ray: bool) -> None:
    import ray

    ray.shutdown()
    os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops every Ray process it started
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=10)
    if had_session_ray:
        init_local_ray()
