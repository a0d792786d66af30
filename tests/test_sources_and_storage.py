"""Input files -> rows with stable ids; stage outputs committed atomically."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_assets.sources import LocalFolderSource, SourceError
from llm_assets.storage import NotMaterializedError, PartitionStore
from tests.helpers.data import write_attempt, write_jsonl


def test_each_file_is_a_partition_and_rows_get_stable_ids(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"q": "x"}, {"q": "y", "extra": 1}])
    write_jsonl(tmp_path / "a.jsonl", [{"q": "z"}])
    (tmp_path / "notes.md").write_text("ignored")
    source = LocalFolderSource(str(tmp_path))
    assert source.partition_keys() == ["a.jsonl", "b.jsonl"]
    rows = pa.concat_tables(source.read("b.jsonl", chunk_rows=1), promote_options="default").to_pylist()
    assert rows == [{"q": "x", "extra": None, "row_id": "b.jsonl:0"}, {"q": "y", "extra": 1, "row_id": "b.jsonl:1"}]


def test_every_format_gives_the_same_rows_and_ids_and_text_files_a_row_per_line(tmp_path):
    rows = [{"q": "a, b"}, {"q": "c"}, {"q": "d"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    (tmp_path / "in.csv").write_text('q\n"a, b"\nc\nd\n')
    (tmp_path / "in.txt").write_text("a, b\n\nc\r\nd")  # empty lines are no rows, as Ray Data's read_text
    for name in ("in.jsonl", "in.parquet", "in.csv", "in.txt"):
        source = LocalFolderSource(str(tmp_path), pattern=f"*{name[2:]}")
        read = pa.concat_tables(source.read(name, chunk_rows=2)).to_pylist()
        column = "text" if name.endswith(".txt") else "q"
        assert read == [{column: r["q"], "row_id": f"{name}:{i}"} for i, r in enumerate(rows)], name
        # The same file as Windows tools save it: a UTF-8 byte order mark first, CRLF line ends.
        if not name.endswith(".parquet"):
            text = (tmp_path / name).read_text()
            (tmp_path / f"bom-{name}").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
            read = pa.concat_tables(source.read(f"bom-{name}", chunk_rows=2)).to_pylist()
            assert read == [{column: r["q"], "row_id": f"bom-{name}:{i}"} for i, r in enumerate(rows)], name
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SourceError, match="empty.txt has no rows"):
        list(LocalFolderSource(str(tmp_path), pattern="*.txt").read("empty.txt"))


def test_a_row_id_column_in_the_file_is_kept_and_must_be_unique(tmp_path):
    pq.write_table(pa.table({"row_id": [7, 8], "q": ["a", "b"]}), tmp_path / "in.parquet")
    source = LocalFolderSource(str(tmp_path), pattern="*.parquet")
    assert next(source.read("in.parquet")).column("row_id").to_pylist() == ["7", "8"]
    pq.write_table(pa.table({"row_id": [7, 7], "q": ["a", "b"]}), tmp_path / "in.parquet")
    with pytest.raises(
        SourceError, match=r"row 1 \(counted from 0\): column 'row_id' repeats 7; row ids must be unique"
    ):
        list(source.read("in.parquet"))


def test_bad_input_files_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"q": "fine"}\n{"q": oops}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(SourceError, match=r"bad.jsonl: line 2 \(row 'bad.jsonl:1'\): invalid JSON"):
        list(LocalFolderSource(str(tmp_path)).read("bad.jsonl"))
    with pytest.raises(SourceError, match="empty.jsonl has no rows"):
        list(LocalFolderSource(str(tmp_path)).read("empty.jsonl"))
    with pytest.raises(SourceError, match="corrupt.parquet: not a readable Parquet file"):
        list(LocalFolderSource(str(tmp_path), pattern="*.parquet").read("corrupt.parquet"))
    with pytest.raises(SourceError, match="no input file 'gone.jsonl'"):
        list(LocalFolderSource(str(tmp_path)).read("gone.jsonl"))
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": 3}\n')
    with pytest.raises(SourceError) as info:
        list(LocalFolderSource(str(tmp_path)).read("mixed.jsonl"))
    # Line numbers count from 1 as editors do; the row id named is the one the row gets (blank lines skipped).
    assert str(info.value).endswith(
        "mixed.jsonl: line 4 (row 'mixed.jsonl:2'): field 'prompt' is a number (3): "
        "expected a string, as on the lines before it"
    )
    (tmp_path / "ids.jsonl").write_text('{"row_id": "q-7", "prompt": "a"}\n{"row_id": "q-8", "prompt": ["b"]}\n')
    with pytest.raises(SourceError, match=r"ids.jsonl: line 2 \(row 'q-8'\): field 'prompt' is a list"):
        list(LocalFolderSource(str(tmp_path)).read("ids.jsonl"))
    (tmp_path / "fine.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    ids = [i for t in LocalFolderSource(str(tmp_path)).read("fine.jsonl") for i in t.column("row_id").to_pylist()]
    assert ids == ["fine.jsonl:0", "fine.jsonl:1"]


def _read(storage, partition="p/1"):
    return pq.read_table(storage.committed_files("pipe", "stage", partition)).to_pylist()


def test_output_is_visible_only_once_committed_and_a_failed_attempt_keeps_the_last_commit(tmp_path):
    storage = PartitionStore(root=str(tmp_path))
    with pytest.raises(NotMaterializedError, match="materialize pipe/stage"):
        storage.committed_files("pipe", "stage", "p/1")

    first = write_attempt(
        storage,
        "pipe",
        "stage",
        "p/1",
        [pa.table({"row_id": ["a", "b", "c"]}), pa.table({"row_id": ["d"]})],
        commit=False,
    )
    with pytest.raises(NotMaterializedError):  # written, not committed: invisible
        storage.committed_files("pipe", "stage", "p/1")
    names = [f"{first}/part-{i:05d}-test.parquet" for i in range(2)]
    storage.commit("pipe", "stage", "p/1", first, names, [3, 1], {})
    assert [r["row_id"] for r in _read(storage)] == ["a", "b", "c", "d"]
    assert storage.manifest("pipe", "stage", "p/1").file_rows == [3, 1]

    write_attempt(storage, "pipe", "stage", "p/1", [pa.table({"row_id": ["x"]})], commit=False)  # the run died
    assert [r["row_id"] for r in _read(storage)] == ["a", "b", "c", "d"]  # the last commit stays whole

    third = write_attempt(storage, "pipe", "stage", "p/1", [pa.table({"row_id": ["y"]})])
    assert _read(storage) == [{"row_id": "y"}]
    partition_dir = tmp_path / "pipe" / "stage" / "p%2F1"
    assert first not in [p.name for p in partition_dir.iterdir()]  # the replaced attempt is deleted
    assert storage.manifest("pipe", "stage", "p/1").attempt == third
    assert not [p for p in partition_dir.rglob(".*")]  # no temporary file left behind
