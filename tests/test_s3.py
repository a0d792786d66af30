"""S3 through a local S3 server over real HTTP (moto_server): landing prefixes, stage outputs,
atomic commits without renames; the runs on the fake engine."""

import json

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_assets.defs.factory import build_definitions
from llm_assets.engines.fake import FakeEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.resources import PartitionStorage, make_resources
from llm_assets.sources import S3PrefixSource, SourceError
from llm_assets.storage import NotMaterializedError, PartitionStore
from tests.helpers.data import questions, write_attempt
from tests.helpers.pipelines import RANGE_END, RANGE_START, engine_starts, tick, to_answer, to_chat


def put_jsonl(client, bucket: str, key: str, rows: list[dict]) -> None:
    client.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in rows).encode())


def object_keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [entry["Key"] for page in pages for entry in page.get("Contents", [])]


def s3_definitions(resource, buckets, model, **pipeline_options):
    """The tiny pipeline landing on s3://landing/in/, its stage outputs under s3://outputs/runs/."""
    pipeline = LLMPipeline(
        "tiny",
        FakeEngineProcessorConfig(model_source=model, engine_kwargs={"max_model_len": 512}, batch_size=4),
        S3PrefixSource(buckets["landing"], prefix="in", s3=resource),
        preprocess=to_chat,
        postprocess=to_answer,
        **pipeline_options,
    )
    storage = PartitionStorage(root=f"s3://{buckets['outputs']}/runs", s3=resource)
    return build_definitions([pipeline], make_resources(storage)), storage.store()


def test_files_landing_on_s3_run_through_every_stage_into_s3_storage(s3, fake_model, ray_session, instance):
    resource, buckets = s3
    client = resource.get_client()
    put_jsonl(client, buckets["landing"], "in/a.jsonl", questions(3, "a"))
    put_jsonl(client, buckets["landing"], "in/2026/b.jsonl", questions(4, "b"))
    client.put_object(Bucket=buckets["landing"], Key="in/notes.txt", Body=b"not an input file")
    defs, storage = s3_definitions(resource, buckets, fake_model)

    data = tick(defs, instance)
    keys = instance.get_dynamic_partitions("tiny")
    assert sorted(keys) == ["2026/b.jsonl", "a.jsonl"]
    [request] = data.run_requests  # one run over both new files
    assert (request.tags[RANGE_START], request.tags[RANGE_END]) == (keys[0], keys[-1])
    result = defs.resolve_job_def("tiny_job").execute_in_process(instance=instance, tags=request.tags)
    assert result.success
    assert engine_starts(instance, result.run_id) == 1

    written = object_keys(client, buckets["outputs"], "runs/tiny/postprocess/")
    assert "runs/tiny/postprocess/2026%2Fb.jsonl/_manifest.json" in written
    assert not [k for k in object_keys(client, buckets["outputs"]) if k.endswith(".tmp")]
    manifest, files = storage.committed("tiny", "postprocess", "2026/b.jsonl")
    rows = pa.concat_tables(pq.read_table(f, filesystem=storage.filesystem()) for f in files).to_pylist()
    assert manifest.rows == 4
    assert sorted(r["row_id"] for r in rows) == [f"2026/b.jsonl:{i}" for i in range(4)]
    assert all(r["tokens"] == 8 for r in rows)
    engine = instance.get_latest_materialization_event(dg.AssetKey(["tiny", "engine"])).asset_materialization
    assert engine.metadata["rows_out"].value == 7  # both partitions of the run
    # The sensor's next tick sees nothing new.
    assert not tick(defs, instance).run_requests


def test_a_malformed_line_on_s3_names_the_object_and_the_line(s3):
    resource, buckets = s3
    resource.get_client().put_object(
        Bucket=buckets["landing"], Key="in/bad.jsonl", Body=b'{"question": "ok"}\n{"question": \n'
    )
    source = S3PrefixSource(buckets["landing"], prefix="in", s3=resource)
    with pytest.raises(
        SourceError, match=rf"s3://{buckets['landing']}/in/bad.jsonl: line 2 \(row 'bad.jsonl:1'\): invalid JSON"
    ):
        list(source.read("bad.jsonl"))


def test_an_s3_commit_is_one_manifest_object_and_a_failed_attempt_keeps_the_last_commit(s3):
    resource, buckets = s3
    storage = PartitionStore(root=f"s3://{buckets['outputs']}/o", s3=resource)
    first_attempt = write_attempt(storage, "p", "stage", "part", [pa.table({"row_id": ["a", "b"]})], commit=False)
    with pytest.raises(NotMaterializedError):
        storage.committed("p", "stage", "part")  # written, not committed: invisible
    storage.commit(
        "p", "stage", "part", first_attempt, [f"{first_attempt}/part-00000-test.parquet"], [2], {"rows_out": 2}
    )
    first = storage.manifest("p", "stage", "part")
    assert first.rows == 2

    write_attempt(storage, "p", "stage", "part", [pa.table({"row_id": ["c"]})], commit=False)  # a run that died
    manifest, files = storage.committed("p", "stage", "part")
    assert manifest.attempt == first.attempt
    assert pq.read_table(files[0], filesystem=storage.filesystem()).column("row_id").to_pylist() == ["a", "b"]

    write_attempt(storage, "p", "stage", "part", [pa.table({"row_id": ["x"]})])
    keys = object_keys(resource.get_client(), buckets["outputs"], "o/p/stage/part/")
    assert not [k for k in keys if first.attempt in k]  # the replaced attempt is deleted
    assert storage.manifest("p", "stage", "part").rows == 1


def test_the_s3_secret_key_appears_in_no_log_metadata_or_output(s3, fake_model, ray_session, instance):
    """Credentials given through the S3Resource never reach logs, metadata or written files."""
    resource, buckets = s3
    secret = resource.aws_secret_access_key
    client = resource.get_client()
    put_jsonl(client, buckets["landing"], "in/a.jsonl", questions(2, "a"))
    defs, _ = s3_definitions(resource, buckets, fake_model, openai_batch_output=f"s3://{buckets['outputs']}/export")
    tick(defs, instance)
    result = defs.resolve_job_def("tiny_job").execute_in_process(instance=instance, partition_key="a.jsonl")
    assert result.success
    records = instance.all_logs(result.run_id)
    assert records and not [r for r in records if secret in repr(r)]  # messages, metadata, check results
    objects = object_keys(client, buckets["outputs"])
    assert any(k.endswith("a.output.jsonl") for k in objects)
    for key in objects:
        assert secret.encode() not in client.get_object(Bucket=buckets["outputs"], Key=key)["Body"].read(), key
