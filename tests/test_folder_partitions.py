"""Sources with one partition per folder (``partition_by="folder"``): a Hive-style Parquet dataset
as pyarrow writes it, locally and on the local S3 server; read, fingerprinted, sensed and run
through every stage (the fake engine: what is tested is partitions and rows, not answers)."""

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_assets.defs.component import PipelineSource
from llm_assets.defs.factory import build_definitions
from llm_assets.engines.fake import FakeEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.resources import PartitionStorage, make_resources
from llm_assets.sources import LocalFolderSource, S3PrefixSource, SourceError
from tests.helpers.pipelines import MAX_TOKENS, engine_materialization, read_output, tick, to_chat

DAYS = {"2026-12-01": ["a", "b", "c"], "2026-12-02": ["d", "e"]}


def write_dataset(root, days=DAYS) -> None:
    """What ``pq.write_to_dataset(..., partition_cols=["date"])`` writes, with two files in the first
    day's folder (one empty, as Spark writes for an empty task) and the files a dataset keeps beside."""
    questions = [q for qs in days.values() for q in qs]
    dates = [d for d, qs in days.items() for _ in qs]
    pq.write_to_dataset(pa.table({"question": questions, "date": dates}), root, partition_cols=["date"])
    first = root / f"date={next(iter(days))}"
    pq.write_table(pa.table({"question": ["z"]}), first / "zz-more.parquet")
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), first / "zzz-empty.parquet")
    (first / "_SUCCESS").write_text("")
    pq.write_metadata(pa.schema([("question", pa.string())]), root / "_common_metadata")


def test_each_folder_is_a_partition_with_its_hive_column_and_rows_ids_by_file(tmp_path):
    write_dataset(tmp_path)
    source = LocalFolderSource(str(tmp_path), pattern="*.parquet", partition_by="folder")
    assert source.partition_keys() == ["date=2026-12-01", "date=2026-12-02"]
    rows = pa.concat_tables(source.read("date=2026-12-01", chunk_rows=2)).to_pylist()
    [first_file] = [p.name for p in sorted((tmp_path / "date=2026-12-01").glob("*.parquet")) if "zz" not in p.name]
    assert [(r["question"], r["date"]) for r in rows] == [
        ("a", "2026-12-01"),
        ("b", "2026-12-01"),
        ("c", "2026-12-01"),
        ("z", "2026-12-01"),
    ]
    assert [r["row_id"] for r in rows] == [f"date=2026-12-01/{first_file}:{i}" for i in range(3)] + [
        "date=2026-12-01/zz-more.parquet:0"
    ]
    assert set(source.fingerprints()) == set(source.partition_keys())
    assert source.fingerprints()["date=2026-12-02"] == source.fingerprint("date=2026-12-02")

    # A file added to one folder changes that folder's fingerprint alone.
    before = source.fingerprints()
    pq.write_table(pa.table({"question": ["late"]}), tmp_path / "date=2026-12-02" / "late.parquet")
    after = source.fingerprints()
    assert after["date=2026-12-01"] == before["date=2026-12-01"]
    assert after["date=2026-12-02"] != before["date=2026-12-02"]


def test_nested_folders_give_one_column_per_key_and_bad_folders_are_named(tmp_path):
    leaf = tmp_path / "year=2026" / "month=12"
    leaf.mkdir(parents=True)
    (leaf / "part.jsonl").write_text('{"question": "q", "row_id": "r1"}\n')
    (leaf / "other.jsonl").write_text('{"question": "q2", "row_id": "r1"}\n')
    (tmp_path / "root.jsonl").write_text('{"question": "in no folder"}\n')
    source = LocalFolderSource(str(tmp_path), partition_by="folder")
    assert source.partition_keys() == ["year=2026/month=12"]
    # The files' own row ids must be unique across the folder: the second file repeats one.
    with pytest.raises(SourceError, match=r"part.jsonl: row 0 .*repeats 'r1'"):
        list(source.read("year=2026/month=12"))
    (leaf / "part.jsonl").write_text('{"question": "q", "row_id": "r0"}\n')
    rows = pa.concat_tables(source.read("year=2026/month=12")).to_pylist()
    assert rows == [
        {"question": "q2", "row_id": "r1", "year": "2026", "month": "12"},
        {"question": "q", "row_id": "r0", "year": "2026", "month": "12"},
    ]
    with pytest.raises(SourceError, match="no input folder '../x'"):
        source.fingerprint("../x")
    (tmp_path / "empty=1").mkdir()
    (tmp_path / "empty=1" / "none.jsonl").write_text("\n")
    with pytest.raises(SourceError, match="the folder 'empty=1' of .* has no rows"):
        list(source.read("empty=1"))
    with pytest.raises(ValueError, match="partition_by='day'"):
        LocalFolderSource(str(tmp_path), partition_by="day")
    built = PipelineSource(folder=str(tmp_path), partition_by="folder").build()
    assert built == source


def folder_pipeline(source, model) -> LLMPipeline:
    return LLMPipeline(
        "tiny",
        FakeEngineProcessorConfig(model_source=model, engine_kwargs={"max_model_len": 512}, batch_size=2),
        source,
        preprocess=lambda row: {**to_chat(row), "date": row["date"]},
        postprocess=lambda row: {
            "question": row["question"],
            "date": row["date"],
            "tokens": row["num_generated_tokens"],
        },
    )


def test_a_dataset_folder_per_day_is_sensed_run_and_run_again_when_a_file_lands_in_it(
    tmp_path, fake_model, ray_session, instance
):
    landing = tmp_path / "landing"
    write_dataset(landing)
    pipeline = folder_pipeline(LocalFolderSource(str(landing), pattern="*.parquet", partition_by="folder"), fake_model)
    storage = PartitionStorage(root=str(tmp_path / "out"))
    defs = build_definitions([pipeline], make_resources(storage))

    [request] = tick(defs, instance).run_requests
    assert instance.get_dynamic_partitions("tiny") == ["date=2026-12-01", "date=2026-12-02"]
    assert defs.resolve_job_def("tiny_job").execute_in_process(instance=instance, tags=request.tags).success
    store = storage.store()
    first = read_output(store, "postprocess", "date=2026-12-01")
    assert [(r["question"], r["date"]) for r in first] == [(q, "2026-12-01") for q in ("a", "b", "c", "z")]
    assert [r["question"] for r in read_output(store, "postprocess", "date=2026-12-02")] == ["d", "e"]
    assert not tick(defs, instance).run_requests

    pq.write_table(pa.table({"question": ["late"]}), landing / "date=2026-12-02" / "late.parquet")
    [again] = tick(defs, instance).run_requests
    assert "date=2026-12-02" in json.dumps(again.tags) and "date=2026-12-01" not in json.dumps(again.tags)
    rerun = defs.resolve_job_def("tiny_job").execute_in_process(instance=instance, tags=again.tags)
    assert rerun.success
    rows = read_output(store, "postprocess", "date=2026-12-02")
    assert [(r["question"], r["date"]) for r in rows] == [
        ("d", "2026-12-02"),
        ("e", "2026-12-02"),
        ("late", "2026-12-02"),
    ]
    # The folder's rows answered before come from the response cache (on by default for greedy
    # requests); only the late file's row reaches the engine.
    engine = engine_materialization(instance, rerun.run_id)
    assert engine["rows_cached"] == 2 and engine["generated_tokens"] == MAX_TOKENS
    answered = {r["question"]: r["request_id"] for r in read_output(store, "engine", "date=2026-12-02")}
    assert [q for q, request in answered.items() if request.endswith("#cached")] == ["d", "e"]


def test_folders_of_objects_on_s3(s3):
    resource, buckets = s3
    client = resource.get_client()
    for day, questions in DAYS.items():
        for index, question in enumerate(questions):
            body = json.dumps({"question": question}) + "\n"
            client.put_object(Bucket=buckets["landing"], Key=f"in/date={day}/part-{index}.jsonl", Body=body.encode())
    client.put_object(Bucket=buckets["landing"], Key="in/date=2026-12-01/_SUCCESS", Body=b"")
    client.put_object(Bucket=buckets["landing"], Key="in/loose.jsonl", Body=b'{"question": "no folder"}\n')
    source = S3PrefixSource(buckets["landing"], prefix="in", s3=resource, partition_by="folder")
    assert source.partition_keys() == ["date=2026-12-01", "date=2026-12-02"]
    assert pickle.loads(pickle.dumps(source)).partition_by == "folder"  # as Ray ships it to a read task
    rows = pa.concat_tables(source.read("date=2026-12-02")).to_pylist()
    assert rows == [
        {"question": "d", "row_id": "date=2026-12-02/part-0.jsonl:0", "date": "2026-12-02"},
        {"question": "e", "row_id": "date=2026-12-02/part-1.jsonl:0", "date": "2026-12-02"},
    ]
    before = source.fingerprints()
    assert before["date=2026-12-01"] == source.fingerprint("date=2026-12-01")
    client.put_object(Bucket=buckets["landing"], Key="in/date=2026-12-01/part-0.jsonl", Body=b'{"question": "new"}\n')
    assert source.fingerprint("date=2026-12-01") != before["date=2026-12-01"]
    assert source.fingerprint("date=2026-12-02") == before["date=2026-12-02"]


@pytest.mark.slow  # folder partitions on S3 (about 9 s); local folders and S3 files stay in the fast tier
def test_a_folder_partition_on_s3_runs_through_every_stage_into_s3_storage(s3, fake_model, ray_session, instance):
    """Folder partitions and S3 together: keys with '=' land in S3 storage, rows keep their column."""
    resource, buckets = s3
    client = resource.get_client()
    for index, question in enumerate(["a", "b", "c"]):
        body = json.dumps({"question": question}) + "\n"
        client.put_object(Bucket=buckets["landing"], Key=f"in/date=2026-12-01/part-{index}.jsonl", Body=body.encode())
    source = S3PrefixSource(buckets["landing"], prefix="in", s3=resource, partition_by="folder")
    storage = PartitionStorage(root=f"s3://{buckets['outputs']}/runs", s3=resource)
    defs = build_definitions([folder_pipeline(source, fake_model)], make_resources(storage))
    [request] = tick(defs, instance).run_requests
    assert defs.resolve_job_def("tiny_job").execute_in_process(instance=instance, tags=request.tags).success
    store = storage.store()
    _, files = store.committed("tiny", "postprocess", "date=2026-12-01")
    rows = pa.concat_tables(pq.read_table(f, filesystem=store.filesystem()) for f in files).to_pylist()
    assert sorted((r["question"], r["date"]) for r in rows) == [(q, "2026-12-01") for q in ("a", "b", "c")]


@pytest.mark.parametrize("partition_by", ["file", "folder"])
def test_partitions_whose_columns_differ_in_type_run_together(
    partition_by, tmp_path, fake_model, ray_session, instance
):
    """A column holding numbers in one partition's rows, text in the next one's and only nulls in a
    third (and, within one folder, missing from one of its files) takes each partition's own type
    through every stage of one run: the partitions are not one table."""
    landing = tmp_path / "landing"
    extras = {"a": [1, 2], "b": ["x", "y"], "c": [None, None]}
    for name, values in extras.items():
        table = pa.table({"question": [f"{name}{i}" for i in range(2)], "extra": values})
        if partition_by == "file":
            (landing / f"{name}.jsonl").parent.mkdir(parents=True, exist_ok=True)
            (landing / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
        else:
            (landing / f"day={name}").mkdir(parents=True)
            pq.write_table(table, landing / f"day={name}" / "part-0.parquet")
            pq.write_table(pa.table({"question": [f"{name}-late"]}), landing / f"day={name}" / "part-1.parquet")
    source = LocalFolderSource(str(landing), pattern="*.parquet", partition_by="folder")
    if partition_by == "file":
        source = LocalFolderSource(str(landing))
    pipeline = folder_pipeline(source, fake_model)
    pipeline.preprocess = to_chat
    pipeline.postprocess = lambda row: {"question": row["question"], "extra": row.get("extra")}
    storage = PartitionStorage(root=str(tmp_path / "out"))
    defs = build_definitions([pipeline], make_resources(storage))
    [request] = tick(defs, instance).run_requests
    assert defs.resolve_job_def("tiny_job").execute_in_process(instance=instance, tags=request.tags).success
    for name, values in extras.items():
        partition = f"{name}.jsonl" if partition_by == "file" else f"day={name}"
        rows = read_output(storage.store(), "postprocess", partition)
        expected = values + ([None] if partition_by == "folder" else [])
        assert [row["extra"] for row in rows] == expected, partition
