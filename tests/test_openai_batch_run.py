"""An OpenAI Batch API input file through a real Dagster run: custom_ids as row ids, the body's
sampling fields honoured, and OpenAI Batch output + error files exported."""

import json
from pathlib import Path

import dagster as dg

from llm_assets.defs.factory import build_definitions
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from tests.test_pipeline_dagster import make_resources


def request(custom_id: str, content: str, max_tokens: int) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_completion_tokens": max_tokens, "temperature": 0},
    }


def test_an_openai_batch_file_runs_and_exports_openai_batch_output(tmp_path, tiny_model, ray_session, instance):
    landing = tmp_path / "landing"
    landing.mkdir()
    lines = [request("req-1", "hello there", 5), request("req-2", "word " * 600, 5), request("req-3", "how are you", 3)]
    (landing / "batch.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    pipeline = LLMPipeline(
        "tiny",
        # should_continue_on_error is left unset: with OpenAI Batch output a failed request goes to the errors file.
        {"model_source": tiny_model, "engine_kwargs": {"max_model_len": 512}, "batch_size": 4},
        LocalFolderSource(str(landing)),
        openai_batch_output=str(tmp_path / "out"),
        max_error_rate=0.5,
    )
    defs = build_definitions([pipeline], make_resources(tmp_path / "storage"))
    instance.add_dynamic_partitions("tiny", ["batch.jsonl"])
    result = defs.resolve_job_def("tiny_job").execute_in_process(instance=instance, partition_key="batch.jsonl")
    assert result.success

    output = [json.loads(line) for line in (tmp_path / "out" / "batch.output.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "out" / "batch.errors.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in output] == ["req-1", "req-3"]
    assert [line["custom_id"] for line in errors] == ["req-2"]
    body = output[0]["response"]["body"]
    assert output[0]["response"]["status_code"] == 200 and output[0]["error"] is None
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 5
    assert output[1]["response"]["body"]["usage"]["completion_tokens"] == 3  # the body's max_completion_tokens
    assert isinstance(body["choices"][0]["message"]["content"], str)
    failure = errors[0]["response"]
    assert failure["status_code"] == 400 and errors[0]["error"] is None
    assert failure["body"]["error"]["code"] == "context_length_exceeded"
    assert "word" not in failure["body"]["error"]["message"]  # the prompt is never echoed
    assert body["model"] == Path(tiny_model).name  # the model that answered, not the request's "tiny"
    exported = instance.get_latest_materialization_event(dg.AssetKey(["tiny", "openai_batch_output"])).asset_materialization
    assert exported.metadata["completed"].value == 2 and exported.metadata["failed"].value == 1
