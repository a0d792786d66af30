"""Models on S3, against a local S3 server over real HTTP (moto_server): a folder uploaded with
``python -m llm_assets.upload_model`` runs a real Dagster run as ``model_source="s3://..."``,
downloaded once per node into the model cache; a download that stopped resumes; a process on
another node (a Ray worker with its own cache) fetches its own copy, once for concurrent ones."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from dagster._serdes import serialize_value

from llm_assets import vLLMEngineProcessorConfig
from llm_assets.model_store import PART_SUFFIX, S3Access, S3ModelPath
from llm_assets.models import ModelSourceError, resolve_model_source
from llm_assets.stages.tokenizer import load_tokenizer
from llm_assets.upload_model import upload
from llm_assets.versions import folder_fingerprint
from tests.helpers.data import questions, write_jsonl
from tests.helpers.pipelines import log_messages, make_pipeline, make_resources, read_output, run_job

pytestmark = pytest.mark.slow

SECRET = "test-secret-key-not-for-logs"  # the s3 fixture's secret key


@pytest.fixture()
def models_bucket(s3):
    resource, buckets = s3
    bucket = buckets["outputs"].replace("outputs", "models")
    resource.get_client().create_bucket(Bucket=bucket)
    return resource, bucket


@pytest.fixture()
def model_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "model-cache"
    monkeypatch.setenv("LLM_ASSETS_MODEL_CACHE", str(cache))
    return cache


def upload_command(model: str, uri: str, endpoint: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "test-key-id",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    command = [
        sys.executable,
        "-m",
        "llm_assets.upload_model",
        "--model-source",
        model,
        "--bucket-uri",
        uri,
        "--endpoint-url",
        endpoint,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_a_model_uploaded_to_s3_answers_as_the_local_folder_and_downloads_once(
    models_bucket, s3_endpoint, tiny_model, model_cache, tmp_path, ray_session, instance
):
    resource, bucket = models_bucket
    uri = f"s3://{bucket}/models/tiny"
    files = len([p for p in Path(tiny_model).rglob("*") if p.is_file()])
    uploaded = upload_command(tiny_model, uri, s3_endpoint)
    assert uploaded.returncode == 0, uploaded.stderr
    assert f"{files} files uploaded, 0 already there" in uploaded.stdout
    assert upload(Path(tiny_model), uri, S3Access.of(resource), log=lambda line: None) == {
        "uploaded": 0,
        "skipped": files,
    }

    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(4, "a"))
    on_s3 = make_pipeline(tmp_path / "landing", uri)
    first = run_job(
        on_s3, make_resources(tmp_path / "s3-run", model_s3=resource), instance, {"dagster/partition": "a.jsonl"}
    )
    local = make_pipeline(tmp_path / "landing", tiny_model)
    run_job(local, make_resources(tmp_path / "local-run"), instance, {"dagster/partition": "a.jsonl"})

    answers = {
        r["row_id"]: r["answer"]
        for r in read_output(make_resources(tmp_path / "s3-run")["storage"].store(), "postprocess", "a.jsonl")
    }
    expected = {
        r["row_id"]: r["answer"]
        for r in read_output(make_resources(tmp_path / "local-run")["storage"].store(), "postprocess", "a.jsonl")
    }
    assert answers == expected and len(answers) == 4  # greedy: the same model gives the same answers
    logged = log_messages(instance, first.run_id)
    assert len([m for m in logged if m.startswith(f"Downloaded {uri} into {model_cache}")]) == 1

    # A later run (a new file: only its partition runs) finds the node's copy.
    write_jsonl(tmp_path / "landing" / "b.jsonl", questions(2, "b"))
    second = run_job(
        on_s3, make_resources(tmp_path / "s3-run", model_s3=resource), instance, {"dagster/partition": "b.jsonl"}
    )
    logged = log_messages(instance, second.run_id)
    assert any(m.startswith(f"{uri}: using the copy in {model_cache}") for m in logged)
    assert not [m for m in logged if m.startswith("Download")]
    # The S3 secret reached no log line, event or Ray session log.
    assert SECRET not in "\n".join(serialize_value(r) for run in (first, second) for r in instance.all_logs(run.run_id))
    ray_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in (p for p in ray_logs.rglob("*") if p.is_file()):
        assert SECRET not in path.read_bytes().decode("latin-1"), path


def test_a_download_that_stopped_resumes_with_the_missing_files_only(models_bucket, tiny_model, model_cache):
    resource, bucket = models_bucket
    uri = f"s3://{bucket}/tiny"
    upload(Path(tiny_model), uri, S3Access.of(resource), log=lambda line: None)
    folder = Path(resolve_model_source(uri, lambda line: None, resource))
    weights = next(folder.glob("*.safetensors"))
    weights.unlink()  # as if the download stopped before it: one file missing, one half written
    (folder / f"tokenizer.json{PART_SUFFIX}").write_bytes(b"half a file")

    lines: list[str] = []
    assert resolve_model_source(uri, lines.append, resource) == str(folder)
    files = len([p for p in Path(tiny_model).rglob("*") if p.is_file()])
    assert lines[0] == f"{uri}: resuming the download into {folder}: {files - 1} of {files} files are here already"
    assert ", 1 of 1 files," in lines[-1] and lines[-1].startswith(f"Downloaded {uri}")
    assert not filecmp.dircmp(tiny_model, folder, ignore=[".llm_assets_s3.json"]).diff_files
    assert (folder / weights.name).exists() and not list(folder.glob(f"*{PART_SUFFIX}"))


def test_a_prefix_without_a_model_folder_fails_naming_it(models_bucket, model_cache):
    resource, bucket = models_bucket
    with pytest.raises(
        ModelSourceError,
        match=rf"s3://{bucket}/nothing-here': no objects under it: expected a Hugging Face model folder",
    ):
        resolve_model_source(f"s3://{bucket}/nothing-here", print, resource)


@ray.remote
def tokenizer_on_another_node(model: S3ModelPath) -> list[str]:
    """A stage task on a node that has not got the model: its own cache (LLM_ASSETS_MODEL_CACHE
    in its environment), the driver's folder absent."""
    lines: list[str] = []
    path = model.on_this_node(lines.append)
    load_tokenizer.cache_clear()
    assert load_tokenizer(model).name_or_path == path
    return lines


def test_another_node_downloads_its_own_copy_once_for_concurrent_processes(
    models_bucket, tiny_model, model_cache, tmp_path, ray_session
):
    resource, bucket = models_bucket
    uri = f"s3://{bucket}/tiny"
    upload(Path(tiny_model), uri, S3Access.of(resource), log=lambda line: None)
    on_driver = resolve_model_source(uri, lambda line: None, resource)
    assert isinstance(on_driver, S3ModelPath) and SECRET not in repr(on_driver)
    os.rename(on_driver, tmp_path / "moved")  # what a node without the driver's files sees

    other_cache = tmp_path / "other-node-cache"
    other_node = tokenizer_on_another_node.options(
        runtime_env={"env_vars": {"LLM_ASSETS_MODEL_CACHE": str(other_cache)}}
    )
    logs = ray.get([other_node.remote(on_driver) for _ in range(2)])
    downloads = [line for lines in logs for line in lines if line.startswith(f"Downloaded {uri} into {other_cache}")]
    assert len(downloads) == 1  # the other process waited for it, then used its files
    copy = other_cache / Path(on_driver).name
    assert not filecmp.dircmp(tiny_model, copy, ignore=[".llm_assets_s3.json"]).diff_files
    # The same response-cache scope on both nodes (files, sizes, modification times).
    assert folder_fingerprint(str(copy)) == folder_fingerprint(str(tmp_path / "moved"))


def test_streaming_weights_from_s3_is_refused_at_definition_naming_what_to_do():
    with pytest.raises(ValueError, match="runai_streamer.*not supported by llm_assets yet.*remove load_format"):
        vLLMEngineProcessorConfig(model_source="s3://models/tiny", engine_kwargs={"load_format": "runai_streamer"})
