"""The same definitions on a real Ray cluster given by address: a head and a worker node started
with `ray start` on this machine (each its own raylet, object store and workers; both see the same
storage folder, as S3 would be for remote workers), real Dagster runs, the vLLM CPU engine.

- A run through ``RayDataResource(address=...)`` with its engine on the worker node (the head being
  busy with another job when the run starts) and CPU-stage tasks on both nodes; the worker node is
  lost while its engine generates (every process of that node SIGKILLed by PID): the run names the
  lost node, rebuilds the engine on the head and finishes; every row comes out once, with the same
  text as a run on a local Ray.
- With no engine restart left, the same loss fails the run naming the lost node, and a re-run on
  the node that is left resumes from the engine's checkpoint files.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import psutil
import pyarrow.parquet as pq
import pytest

from llm_assets.resources import PartitionStorage, RayDataResource, make_resources
from llm_assets.storage import PartitionStore
from tests.helpers.data import questions, write_jsonl
from tests.helpers.local_ray import init_local_ray
from tests.helpers.pipelines import log_messages, make_pipeline, run_job
from tests.helpers.processes import free_port, kill_processes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ROWS = 64
MAX_TOKENS = 24
# A re-run keeps the engine's checkpoint files only if their input, Tokenize's output, was
# committed: with long answers, Tokenize commits while the engine has most of its work to do (the
# CPU stages, not this tiny engine, are the slow part on 2 busy cores).
LONG_MAX_TOKENS = 256
# One sequence at a time (in the local run too, for the same tokens): the tiny engine otherwise
# answers all rows before the worker node can be killed mid-partition.
ONE_AT_A_TIME = 1
# The engine's rows are written a block at a time, a block being four batches (Ray Data runs four
# batches of a task at once): four blocks here.
LONG_BATCH = 4
PARTITION = "x.jsonl"
# Ray notices a lost node by its health checks (GCS defaults: about 30 s); checked every half
# second here, so a run sees its engine's node die within seconds: a killed raylet refuses the
# check's connection at once, and three refusals mark it dead. The timeout stays Ray's default
# 10 s: a raylet that is alive but starved of CPU on 2 busy cores missed 500 ms deadlines, and
# three misses in a row once marked the head dead, which ends every driver on it (pytest's own
# process, exit 1 and no output).
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "10000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "500",
}


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def ask(row, max_tokens: int = MAX_TOKENS):
    return {
        "question": row["question"],
        "preprocess_node": node_id(),
        "messages": [{"role": "user", "content": row["question"]}],
        "sampling_params": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0},
    }


def ask_at_length(row):
    return ask(row, LONG_MAX_TOKENS)


def answer(row):
    return {
        "question": row["question"],
        "answer": row["generated_text"],
        "tokens": row["num_generated_tokens"],
        "preprocess_node": row["preprocess_node"],
        "postprocess_node": node_id(),
    }


def pipeline(landing: Path, model: str, preprocess=ask, batch_size: int = 4, max_num_seqs: int = 4):
    # Few sequences at a time and one batch at a time: rows finish in small waves, so the first
    # checkpoint comes while most rows are still to do.
    return make_pipeline(
        landing,
        model,
        preprocess=preprocess,
        postprocess=answer,
        batch_size=batch_size,
        max_concurrent_batches=1,
        max_tasks_in_flight_per_actor=1,
        engine_kwargs={"max_model_len": 512, "max_num_seqs": max_num_seqs},
    )


class Busy:
    """Another job's actor on the head node."""

    def ready(self) -> bool:
        return True


class Node:
    """One `ray start --block` node of this machine; ``stop`` SIGKILLs every process of it by PID
    (its raylet, agents, workers and the engines they host), as a lost machine would end them."""

    def __init__(self, args: list[str], log: Path):
        # Workers import the tests' functions. Ray's token authentication as this process has it:
        # a driver connects only to a cluster of its own mode (unset, Ray 2.60's driver sends no
        # token), and a process that used a Ray with one mode and then connects to a cluster with
        # another gets actors that die before they start. The tests' session Ray (conftest), once
        # started, has set RAY_AUTH_MODE=token in this process; before that it is unset: disabled.
        env = {
            **os.environ,
            **FAST_HEALTH_CHECKS,
            "PYTHONPATH": str(ROOT),
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or "disabled",
        }
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "ray"),
                    "start",
                    "--block",
                    "--disable-usage-stats",
                    "--object-store-memory=300000000",
                    f"--dashboard-agent-listen-port={free_port()}",
                    *args,
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def processes(self) -> list:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> list:
        processes = self.processes()
        kill_processes(processes)
        return processes


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head = Node(
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=2",
                "--resources",
                json.dumps({"head_node": 1}),
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={tmp / 'ray'}",
            ],
            tmp / "head.log",
        )
        self.workers: list[Node] = []
        try:
            self.head_id = self._wait_for_node("head_node")
        except BaseException:
            self.stop()
            raise

    def add_worker(self) -> str:
        """A worker node (3 logical CPUs; the 2 real cores are shared by every process here)."""
        name = f"worker_{len(self.workers)}"
        self.workers.append(
            Node(
                [f"--address={self.address}", "--num-cpus=3", "--resources", json.dumps({name: 1})],
                self.tmp / f"{name}.log",
            )
        )
        return self._wait_for_node(name)  # the fixture stops it, joined or not

    def _wait_for_node(self, resource: str) -> str:
        """The node's id, once it has joined (this process connects for that moment only: a run
        connects itself, through RayDataResource, and disconnects at its end)."""
        import ray

        deadline = time.monotonic() + 90
        while True:
            try:
                ray.init(address=self.address, namespace="llm_assets_tests")
                try:
                    alive = [n for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
                finally:
                    ray.shutdown()
                if alive:
                    return alive[0]["NodeID"]
            except ConnectionError:
                pass  # the head's GCS is not up yet
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Ray node with resource {resource} did not join: {(self.tmp / 'head.log').read_text()[-2000:]}"
                )
            time.sleep(1)

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            node.stop()


BUSY = "another-job"


def hold_the_head(cluster: Cluster) -> None:
    """Another job holds all of the head's 2 CPUs when the run starts, so Ray places the run's engine
    and its first CPU-stage tasks on the worker node (with half a CPU free, the head, the run's own
    node, took every preprocess task in one CI run). The job ends once that engine has started
    (``release_the_head``): what runs after the worker's loss runs on the head."""
    import ray

    ray.init(address=cluster.address, namespace="llm_assets")
    try:
        busy = (
            ray.remote(Busy).options(name=BUSY, lifetime="detached", num_cpus=2, resources={"head_node": 0.01}).remote()
        )
        assert ray.get(busy.ready.remote(), timeout=60)
    finally:
        ray.shutdown()


def release_the_head() -> None:
    import ray  # the run's own connection (RayDataResource's), from the killer thread

    ray.kill(ray.get_actor(BUSY, namespace="llm_assets"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    had_session_ray = ray.is_initialized()
    if had_session_ray:  # the tests' session Ray (conftest): the runs here connect by address
        ray.shutdown()
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster
    finally:
        if ray.is_initialized():  # a run that failed before its teardown
            ray.shutdown()
        cluster.stop()
        if had_session_ray:
            init_local_ray()


def on_cluster(cluster: Cluster, storage: Path, **engine_pool) -> dict:
    return make_resources(PartitionStorage(root=str(storage)), RayDataResource(address=cluster.address), **engine_pool)


def answers(storage: PartitionStorage) -> list[dict]:
    return pq.read_table(storage.committed_files("tiny", "postprocess", PARTITION)).to_pylist()


def engine_rows(storage: PartitionStorage) -> list[str]:
    """Row ids of the engine's committed output, as written (a duplicate would show twice)."""
    manifest = storage.manifest("tiny", "engine", PARTITION)
    base = storage.partition_dir("tiny", "engine", PARTITION)
    return [
        row_id for name in manifest.files for row_id in pq.read_table(f"{base}/{name}").column("row_id").to_pylist()
    ]


def count_rows(storage: PartitionStorage) -> dict[str, int]:
    row_ids = engine_rows(storage)
    counts = {
        "in": ROWS,
        "out": len(row_ids),
        "duplicated": len(row_ids) - len(set(row_ids)),
        "lost": len({f"{PARTITION}:{i}" for i in range(ROWS)} - set(row_ids)),
    }
    print(f"rows {counts}")
    return counts


def engine_metadata(instance) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(["tiny", "engine"]))
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def checkpoints(storage_root: Path) -> list[Path]:
    """The engine's complete part files of the partition (one per batch), committed or not."""
    return list((storage_root / "tiny" / "engine" / PARTITION).glob("attempt-*/part-*.parquet"))


def lose_worker_while_it_generates(
    instance, cluster: Cluster, storage_root: Path, seen: dict, after_tokenize: bool
) -> None:
    """Once the run's engine has started on the worker node, ends the job that held the head; once
    the engine stage has written its first batch (the engine is mid-partition), and Tokenize has
    committed if ``after_tokenize``, SIGKILLs every process of the worker node."""
    worker = cluster.workers[-1]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = instance.get_runs(limit=1)
        messages = log_messages(instance, runs[0].run_id) if runs else []
        started = re.search(r"vLLM engine 0 started in .* \(pid (\d+) ", "\n".join(m for m in messages if m))
        if started and "pid" not in seen:
            seen.update(
                pid=int(started.group(1)), on_worker=int(started.group(1)) in {p.pid for p in worker.processes()}
            )
            release_the_head()
        tokenized = (storage_root / "tiny" / "tokenize" / PARTITION / "_manifest.json").exists() or not after_tokenize
        if started and checkpoints(storage_root) and tokenized:
            seen.update(
                killed=len(worker.stop()),
                killed_at=time.time(),
                rows_written=sum(pq.ParquetFile(p).metadata.num_rows for p in checkpoints(storage_root)),
            )
            return
        time.sleep(0.2)


def run_losing_the_worker(
    pipeline_, resources, instance, cluster: Cluster, storage_root: Path, after_tokenize: bool = False
) -> tuple:
    hold_the_head(cluster)
    seen: dict = {}
    killer = threading.Thread(
        target=lose_worker_while_it_generates, args=(instance, cluster, storage_root, seen, after_tokenize), daemon=True
    )
    killer.start()
    result = run_job(pipeline_, resources, instance, {"dagster/partition": PARTITION}, raise_on_error=False)
    killer.join(timeout=5)
    assert seen.get("on_worker"), f"the run's engine did not start on the worker node: {seen}"
    assert seen.get("killed"), f"the worker node was never killed: {seen}"
    return result, seen


@pytest.fixture(scope="module")
def local_answers(tiny_model, tmp_path_factory) -> dict[str, str]:
    """The same pipeline on a local Ray (no address), in a process of its own, as a user's run."""
    root = tmp_path_factory.mktemp("local")
    write_jsonl(root / "landing" / PARTITION, questions(ROWS, "c"))
    subprocess.run(
        [sys.executable, "-m", "tests.test_ray_cluster", str(root / "landing"), tiny_model, str(root / "storage")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        capture_output=True,
    )
    return {row["row_id"]: row["answer"] for row in answers(PartitionStore(root=str(root / "storage")))}


def test_a_lost_worker_node_costs_its_engine_which_is_rebuilt_on_the_head(
    local_answers, cluster, tiny_model, tmp_path, instance
):
    worker_id = cluster.add_worker()
    write_jsonl(tmp_path / "landing" / PARTITION, questions(ROWS, "c"))
    resources = on_cluster(cluster, tmp_path / "storage", max_engine_restarts=1)
    result, seen = run_losing_the_worker(
        pipeline(tmp_path / "landing", tiny_model, max_num_seqs=ONE_AT_A_TIME),
        resources,
        instance,
        cluster,
        tmp_path / "storage",
    )
    print(
        f"engine started on the worker node (pid {seen['pid']}); {seen['killed']} processes of the worker node killed "
        f"once the engine stage had written {seen['rows_written']} of {ROWS} rows"
    )
    assert result.success
    messages = log_messages(instance, result.run_id)
    for line in timeline(instance, result.run_id, ("vLLM engine 0", "engine [", "Starting"), seen["killed_at"]):
        print(line)
    died = [m for m in messages if m.startswith("vLLM engine 0 died")]
    assert len(died) == 1 and f"on Ray node {worker_id}" in died[0] and "lost by the Ray cluster" in died[0], died
    assert re.search(r"with its \d+ batch\(es\) in flight", died[0]), died[0]
    assert 0 < seen["rows_written"] < ROWS  # lost mid-partition
    assert sum("vLLM engine 0 started in" in m for m in messages) == 2  # on the worker, then its replacement

    # CPU-stage tasks ran on both nodes; the engine that finished the partition, on the head.
    rows = answers(resources["storage"].store())
    nodes = {cluster.head_id: "head", worker_id: "worker"}
    cpu_nodes = {nodes.get(r[key], r[key]) for r in rows for key in ("preprocess_node", "postprocess_node")}
    placement = [
        (p["engine"], nodes.get(p["node_id"], p["node_id"])) for p in engine_metadata(instance)["engine_placement"]
    ]
    print(f"CPU-stage tasks ran on {sorted(cpu_nodes)}; engine at the end: {placement}")
    assert cpu_nodes == {"head", "worker"}
    assert placement == [(0, "head")]

    assert count_rows(resources["storage"].store()) == {"in": ROWS, "out": ROWS, "duplicated": 0, "lost": 0}
    assert {r["row_id"]: r["answer"] for r in rows} == local_answers  # greedy: the same text as a local run
    assert all(r["tokens"] == MAX_TOKENS for r in rows)


def timeline(instance, run_id, marks: tuple[str, ...], killed_at: float) -> list[str]:
    """Seconds from the run's start to each log line that contains one of ``marks``, and to the kill."""
    events = instance.all_logs(run_id)
    lines = [
        (e.timestamp, e.user_message[:150])
        for e in events
        if e.user_message and any(mark in e.user_message for mark in marks)
    ]
    return [
        f"{at - events[0].timestamp:6.1f} s  {text}"
        for at, text in sorted([*lines, (killed_at, "(every process of the worker node killed)")])
    ]


def test_with_no_restart_left_the_run_fails_naming_the_node_and_a_rerun_resumes(cluster, tiny_model, tmp_path):
    worker_id = cluster.add_worker()
    storage_root = tmp_path / "storage"
    write_jsonl(tmp_path / "landing" / PARTITION, questions(ROWS, "c"))
    # Two sequences at a time: every row is tokenized before the engine is ready, and the first
    # checkpoint must still come well before the last row (in a loaded suite, the task that
    # writes it waits seconds for a new worker).
    tiny = pipeline(tmp_path / "landing", tiny_model, preprocess=ask_at_length, batch_size=LONG_BATCH, max_num_seqs=2)
    with dg.instance_for_test() as instance:
        failed, seen = run_losing_the_worker(
            tiny,
            on_cluster(cluster, storage_root, max_engine_restarts=0),
            instance,
            cluster,
            storage_root,
            after_tokenize=True,
        )
        assert not failed.success
        failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error
        headline = (failure.cause or failure).message.splitlines()[0]
        print(headline)
        assert re.search(
            rf"vLLM engine 0 died \(.*\) on Ray node {worker_id} \(host .*, lost by the Ray cluster\) "
            "and no restart is left",
            headline,
        ), headline
        kept = checkpoints(storage_root)
        rows_kept = sum(pq.ParquetFile(path).metadata.num_rows for path in kept)
        assert 0 < rows_kept < ROWS

        # The re-run, on the node that is left, keeps the engine's complete files and sends only the
        # rows they lack to its engine.
        resources = on_cluster(cluster, storage_root)
        rerun = run_job(tiny, resources, instance, {"dagster/partition": PARTITION})
        assert rerun.success
        messages = log_messages(instance, rerun.run_id)
        assert any(
            f"{rows_kept} of {ROWS} rows already written are kept; the other {ROWS - rows_kept} go to the engine" in m
            for m in messages
        ), [m for m in messages if "kept" in (m or "")]
        manifest = resources["storage"].store().manifest("tiny", "engine", PARTITION)
        assert manifest.stats["rows_resumed"] == rows_kept
        assert all(
            str(path.relative_to(storage_root / "tiny" / "engine" / PARTITION)) in manifest.files for path in kept
        )
    print(f"rows kept from the failed run {rows_kept}, generated by the re-run {ROWS - rows_kept}")
    assert count_rows(resources["storage"].store()) == {"in": ROWS, "out": ROWS, "duplicated": 0, "lost": 0}
    assert sorted(r["tokens"] for r in answers(resources["storage"].store())) == [LONG_MAX_TOKENS] * ROWS


if __name__ == "__main__":  # the local run of local_answers, in a process of its own
    landing_arg, model_arg, storage_arg = sys.argv[1:4]
    with dg.instance_for_test() as local_instance:
        run_job(
            pipeline(Path(landing_arg), model_arg, max_num_seqs=ONE_AT_A_TIME),
            make_resources(PartitionStorage(root=storage_arg)),
            local_instance,
            {"dagster/partition": PARTITION},
        )
