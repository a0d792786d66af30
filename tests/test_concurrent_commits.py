"""Two writers committing the same partition at once leave one complete output, never a mix,
on a local disk and on S3 (real threads, real filesystems)."""

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_assets.storage import PartitionStore
from tests.helpers.data import write_attempt

ROUNDS = 10


def write_and_commit(storage, writer_name: str, rows: int, barrier: threading.Barrier, errors: list) -> None:
    try:
        tables = [
            pa.table({"row_id": [f"{writer_name}-{chunk}-{i}" for i in range(rows)], "writer": [writer_name] * rows})
            for chunk in range(3)
        ]
        attempt = write_attempt(storage, "p", "stage", "part", tables, commit=False)
        barrier.wait()  # both finish writing, then commit at the same moment
        names = [f"{attempt}/part-{i:05d}-test.parquet" for i in range(3)]
        storage.commit("p", "stage", "part", attempt, names, [rows] * 3, {"rows_out": 3 * rows})
    except Exception as exc:  # surfaced by the test
        errors.append(exc)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_concurrent_commits_of_one_partition_leave_one_complete_output(where, tmp_path, request):
    if where == "s3":
        resource, buckets = request.getfixturevalue("s3")
        storage = PartitionStore(root=f"s3://{buckets['outputs']}/c", s3=resource)
    else:
        storage = PartitionStore(root=str(tmp_path))
    expected = {"a": 3 * 10, "b": 3 * 7}
    for _ in range(ROUNDS):
        barrier, errors = threading.Barrier(2), []
        threads = [
            threading.Thread(target=write_and_commit, args=(storage, name, rows // 3, barrier, errors))
            for name, rows in expected.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        manifest, files = storage.committed("p", "stage", "part")
        table = pa.concat_tables(pq.read_table(f, filesystem=storage.filesystem()) for f in files)
        writers = set(table.column("writer").to_pylist())
        assert len(writers) == 1  # one writer's output, whole
        winner = writers.pop()
        assert table.num_rows == manifest.rows == expected[winner]
        assert len(set(table.column("row_id").to_pylist())) == table.num_rows
