"""A run killed mid-engine-stage (SIGKILL of the run's process and everything it started), then
run again: committed stages are not recomputed, the engine's complete checkpoint files are kept,
and only the rows they lack go to the engine. Every row id comes out exactly once.

The first run is a real Dagster run in a subprocess (its own local Ray, on the fake engine, whose
batches take a quarter of a second each); the test kills that process tree once the engine stage has
written its first batch's file and the stages before it have committed.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_assets.atomic import write_parquet
from llm_assets.resources import PartitionStorage, make_resources
from llm_assets.storage import PartitionStore
from tests.helpers.data import questions, write_attempt, write_jsonl
from tests.helpers.pipelines import fake_pipeline, log_messages, run_job
from tests.helpers.processes import kill_processes

ROWS = 160
REPO = Path(__file__).resolve().parent.parent


def answer_at_length(row):
    return {
        "question": row["question"],
        "messages": [{"role": "user", "content": row["question"]}],
        "sampling_params": {"max_tokens": 48, "ignore_eos": True, "temperature": 0},
    }


def resumable_pipeline(landing, model):
    # A quarter of a second a batch, one batch at a time: checkpoints come while most rows are still to do.
    return fake_pipeline(landing, model, preprocess=answer_at_length, batch_delay_s=0.25)


def resumable_resources(storage_root) -> dict:
    return make_resources(PartitionStorage(root=str(storage_root)))


def complete_checkpoints(storage_root: Path) -> dict[str, int]:
    """Complete engine part files of uncommitted attempts (one per batch): name -> size."""
    partition = storage_root / "tiny" / "engine" / "x.jsonl"
    return {str(p.relative_to(partition)): p.stat().st_size for p in partition.glob("attempt-*/part-*.parquet")}


def kill_tree(process: subprocess.Popen) -> None:
    root = psutil.Process(process.pid)
    kill_processes([root, *root.children(recursive=True)])


@pytest.mark.slow  # a kill test (a run in its own process, killed; about 45 s on 2 cores)
def test_a_run_killed_mid_engine_resumes_from_its_checkpoints(tmp_path, fake_model, ray_session, instance):
    landing, storage_root = tmp_path / "landing", tmp_path / "storage"
    write_jsonl(landing / "x.jsonl", questions(ROWS, "r"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "first-run.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "tests.test_checkpoint_resume", str(landing), fake_model, str(storage_root)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # Killed once the engine has checkpointed and the CPU stages before it have committed (in
        # a streaming run the engine's first batch can finish before Tokenize's last one).
        tokenize_committed = storage_root / "tiny" / "tokenize" / "x.jsonl" / "_manifest.json"
        deadline = time.monotonic() + 600
        while (
            not (complete_checkpoints(storage_root) and tokenize_committed.exists())
            and first.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert first.poll() is None, (
            f"the first run ended before any checkpoint: {(tmp_path / 'first-run.log').read_text()[-3000:]}"
        )
        kill_tree(first)
    engine_dir = storage_root / "tiny" / "engine" / "x.jsonl"
    assert not (engine_dir / "_manifest.json").exists()  # killed before the engine committed
    kept = complete_checkpoints(storage_root)
    rows_kept = sum(pq.ParquetFile(engine_dir / name).metadata.num_rows for name in kept)
    assert 0 < rows_kept < ROWS

    resources = resumable_resources(storage_root)
    result = run_job(resumable_pipeline(landing, fake_model), resources, instance, {"dagster/partition": "x.jsonl"})

    assert result.success
    messages = log_messages(instance, result.run_id)
    for stage in ("preprocess", "chat_template", "tokenize"):  # committed by the first run
        assert any(m.startswith(f"{stage} [x.jsonl]: up to date") for m in messages), stage
    assert any(
        f"{rows_kept} of {ROWS} rows already written are kept; the other {ROWS - rows_kept} go to the engine" in m
        for m in messages
    )
    manifest = resources["storage"].store().manifest("tiny", "engine", "x.jsonl")
    assert manifest.stats["rows_resumed"] == rows_kept
    # The checkpoint files are part of the output as they were written; the rest is new.
    for name, size in kept.items():
        assert name in manifest.files and (engine_dir / name).stat().st_size == size
    new_files = [name for name in manifest.files if name not in kept]
    rows_generated_now = sum(pq.ParquetFile(engine_dir / name).metadata.num_rows for name in new_files)
    # Columns by name: a kept checkpoint file and a new one may list the engine's columns in another
    # order (seen once in the suite: time_taken_llm and request_id before or after the logprobs).
    engine = pa.concat_tables(
        (pq.read_table(engine_dir / name) for name in manifest.files), promote_options="permissive"
    )
    row_ids = engine.column("row_id").to_pylist()
    print(
        f"rows in {ROWS}, kept from the killed run {rows_kept}, generated by the re-run {rows_generated_now}, "
        f"rows out {len(row_ids)}, duplicates {len(row_ids) - len(set(row_ids))}, lost {ROWS - len(set(row_ids))}"
    )
    assert rows_generated_now == ROWS - rows_kept
    assert sorted(row_ids) == sorted(f"x.jsonl:{i}" for i in range(ROWS))
    assert set(engine.column("num_generated_tokens").to_pylist()) == {48}
    final = pq.read_table(resources["storage"].store().committed_files("tiny", "postprocess", "x.jsonl"))
    assert final.num_rows == ROWS


@pytest.mark.parametrize("partition", ["part", "year=2026/month=12"])  # a file's key, a nested folder's
@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_uncommitted_attempt_is_adopted_only_with_the_same_code_version_and_input(
    where, partition, tmp_path, request
):
    """Storage level, locally and on S3, for a file's partition and a Hive folder's: the complete
    files of an attempt that never committed are found by a later run with the same code version
    and input, not by one with another input, and never once that attempt is committed."""
    if where == "s3":
        resource, buckets = request.getfixturevalue("s3")
        storage = PartitionStore(root=f"s3://{buckets['outputs']}/ck", s3=resource)
    else:
        storage = PartitionStore(root=str(tmp_path))
    info = {"code_version": "v1", "input": "attempt-a"}
    assert storage.resumable_attempt("p", "engine", partition, info) is None
    tables = [pa.table({"row_id": [f"{chunk}-{i}" for i in range(5)]}) for chunk in range(2)]
    interrupted = write_attempt(storage, "p", "engine", partition, tables, commit=False, info=info)
    # The process dies here, before the third batch's file and the commit.

    assert storage.resumable_attempt("p", "engine", partition, {**info, "input": "attempt-b"}) is None
    attempt, names, rows = storage.resumable_attempt("p", "engine", partition, info)
    assert attempt == interrupted and rows == [5, 5] and len(names) == 2
    third = f"{attempt}/part-00002-rerun.parquet"
    write_parquet(
        storage.filesystem(),
        f"{storage.partition_dir('p', 'engine', partition)}/{third}",
        pa.table({"row_id": [f"2-{i}" for i in range(5)]}),
    )
    manifest = storage.commit("p", "engine", partition, attempt, [*names, third], [*rows, 5], {})
    _, files = storage.committed("p", "engine", partition)
    table = pa.concat_tables(pq.read_table(f, filesystem=storage.filesystem()) for f in files)
    assert manifest.rows == table.num_rows == 15
    assert sorted(table.column("row_id").to_pylist()) == sorted(f"{c}-{i}" for c in range(3) for i in range(5))
    assert (
        storage.resumable_attempt("p", "engine", partition, info) is None
    )  # a committed attempt is never adopted again


if __name__ == "__main__":  # the first run, in a process of its own
    import dagster as dg

    landing_arg, model_arg, storage_arg = sys.argv[1:4]
    with dg.instance_for_test() as run_instance:
        run_job(
            resumable_pipeline(landing_arg, model_arg),
            resumable_resources(storage_arg),
            run_instance,
            {"dagster/partition": "x.jsonl"},
        )
