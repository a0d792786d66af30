"""Input files -> rows with stable ids; stage outputs committed atomically."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_assets.sources import LocalFolderSource, SourceError
from resources.storage import NotMaterializedError, PartitionStorage
from tests.conftest import write_jsonl


def test_each_file_is_a_partition_and_rows_get_stable_ids(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"q": "x"}, {"q": "y", "extra": 1}])
    write_jsonl(tmp_path / "a.jsonl", [{"q": "z"}])
    (tmp_path / "notes.txt").write_text("ignored")
    source = LocalFolderSource(str(tmp_path))
    assert source.partition_keys() == ["a.jsonl", "b.jsonl"]
    rows = pa.concat_tables(source.read("b.jsonl", chunk_rows=1), promote_options="default").to_pylist()
    assert rows == [{"q": "x", "extra": None, "row_id": "b.jsonl:0"}, {"q": "y", "extra": 1, "row_id": "b.jsonl:1"}]


def test_a_row_id_column_in_the_file_is_kept_and_must_be_unique(tmp_path):
    pq.write_table(pa.table({"row_id": [7, 8], "q": ["a", "b"]}), tmp_path / "in.parquet")
    source = LocalFolderSource(str(tmp_path), pattern="*.parquet")
    assert next(source.read("in.parquet")).column("row_id").to_pylist() == ["7", "8"]
    pq.write_table(pa.table({"row_id": [7, 7], "q": ["a", "b"]}), tmp_path / "in.parquet")
    with pytest.raises(SourceError, match="row 1: column 'row_id' repeats 7; row ids must be unique"):
        list(source.read("in.parquet"))


def test_bad_input_files_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"q": "fine"}\n{"q": oops}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(SourceError, match=r"bad.jsonl: line 2: invalid JSON"):
        list(LocalFolderSource(str(tmp_path)).read("bad.jsonl"))
    with pytest.raises(SourceError, match="empty.jsonl has no rows"):
        list(LocalFolderSource(str(tmp_path)).read("empty.jsonl"))
    with pytest.raises(SourceError, match="corrupt.parquet: not a readable Parquet file"):
        list(LocalFolderSource(str(tmp_path), pattern="*.parquet").read("corrupt.parquet"))
    with pytest.raises(SourceError, match="no input file 'gone.jsonl'"):
        list(LocalFolderSource(str(tmp_path)).read("gone.jsonl"))


def _read(storage, partition="p/1"):
    return pq.read_table(storage.committed_files("pipe", "stage", partition)).to_pylist()


def test_output_is_visible_only_once_committed_and_a_failed_attempt_keeps_the_last_commit(tmp_path):
    storage = PartitionStorage(root=str(tmp_path), max_rows_per_file=2)
    with pytest.raises(NotMaterializedError, match="materialize pipe/stage"):
        storage.committed_files("pipe", "stage", "p/1")

    first = storage.writer("pipe", "stage", "p/1")
    first.write(pa.table({"row_id": ["a", "b", "c"]}))
    first.write(pa.table({"row_id": ["d"]}))
    with pytest.raises(NotMaterializedError):  # written, not committed: invisible
        storage.committed_files("pipe", "stage", "p/1")
    first.commit({"rows": 4})
    assert [r["row_id"] for r in _read(storage)] == ["a", "b", "c", "d"]
    assert len(storage.committed_files("pipe", "stage", "p/1")) == 2  # rolled at max_rows_per_file

    second = storage.writer("pipe", "stage", "p/1")
    second.write(pa.table({"row_id": ["x"]}))
    second.abort()  # the run died: the last commit stays whole
    assert [r["row_id"] for r in _read(storage)] == ["a", "b", "c", "d"]

    third = storage.writer("pipe", "stage", "p/1")
    third.write(pa.table({"row_id": ["y"]}))
    third.commit({})
    assert _read(storage) == [{"row_id": "y"}]
    partition_dir = tmp_path / "pipe" / "stage" / "p%2F1"
    assert sorted(p.name for p in partition_dir.iterdir() if p.is_dir()) == [third.attempt]


def test_batches_whose_types_differ_only_by_nulls_share_a_file(tmp_path):
    storage = PartitionStorage(root=str(tmp_path))
    writer = storage.writer("pipe", "stage", "k")
    writer.write(pa.table({"row_id": ["a"], "text": ["hi"]}))
    writer.write(pa.table({"row_id": ["b"], "text": pa.array([None], pa.null())}))
    writer.commit({})
    assert len(storage.committed_files("pipe", "stage", "k")) == 1
    assert _read(storage, "k") == [{"row_id": "a", "text": "hi"}, {"row_id": "b", "text": None}]
