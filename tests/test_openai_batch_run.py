"""An OpenAI Batch API input file through a real Dagster run: custom_ids as row ids, the body's
sampling fields honoured (log probabilities included), and OpenAI Batch output + error files exported."""

import json
from pathlib import Path

import dagster as dg
import pytest

from llm_assets.defs.factory import build_definitions
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from tests.helpers.pipelines import make_resources

pytestmark = pytest.mark.slow


def request(custom_id: str, content: str, max_tokens: int, **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_completion_tokens": max_tokens,
            "temperature": 0,
            **body,
        },
    }


def completion_request(custom_id: str, prompt: str, max_tokens: int, **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **body},
    }


def test_an_openai_batch_file_runs_and_exports_openai_batch_output(tmp_path, tiny_model, ray_session, instance):
    landing = tmp_path / "landing"
    landing.mkdir()
    lines = [
        request("req-1", "hello there", 5),
        request("req-2", "word " * 600, 5),
        request("req-3", "how are you", 3),
        request("chat-lp", "hello there", 5, logprobs=True, top_logprobs=3),
        request("chat-lp0", "tell me more", 4, logprobs=True),
        completion_request("text-lp", "Once upon a time", 4, logprobs=2),
    ]
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
    assert [line["custom_id"] for line in output] == ["req-1", "req-3", "chat-lp", "chat-lp0", "text-lp"]
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
    exported = instance.get_latest_materialization_event(
        dg.AssetKey(["tiny", "openai_batch_output"])
    ).asset_materialization
    assert exported.metadata["completed"].value == 5 and exported.metadata["failed"].value == 1
    assert body["choices"][0]["logprobs"] is None  # a request that did not ask
    bodies = {line["custom_id"]: line["response"]["body"] for line in output}
    assert_logprobs(bodies)


def assert_logprobs(bodies: dict[str, dict]) -> None:
    """What a user checks in the log probabilities the real engine gave: one entry per generated
    token, the sampled token's logprob <= 0 and, at temperature 0, the likeliest; N alternatives;
    the token texts joined give the text."""
    for custom_id, top_n in (("chat-lp", 3), ("chat-lp0", 0)):
        choice = bodies[custom_id]["choices"][0]
        content = choice["logprobs"]["content"]
        assert len(content) == bodies[custom_id]["usage"]["completion_tokens"] > 0
        for position in content:
            assert position["logprob"] <= 0 and position["bytes"] == list(position["token"].encode("utf-8"))
            assert len(position["top_logprobs"]) == top_n
            if top_n:  # greedy: the sampled token is the first of the top ones
                assert position["top_logprobs"][0]["token"] == position["token"]
                assert [top["logprob"] for top in position["top_logprobs"]] == sorted(
                    (top["logprob"] for top in position["top_logprobs"]), reverse=True
                )
        assert_joined_tokens_give_the_text(
            [position["token"] for position in content], choice["message"]["content"], choice["finish_reason"]
        )
    choice = bodies["text-lp"]["choices"][0]
    logprobs = choice["logprobs"]
    assert (
        len(logprobs["tokens"])
        == len(logprobs["token_logprobs"])
        == len(logprobs["top_logprobs"])
        == bodies["text-lp"]["usage"]["completion_tokens"]
    )
    assert all(value <= 0 for value in logprobs["token_logprobs"])
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert 1 <= len(top) <= 3 and top[token] == logprob  # the top 2 and the sampled token (one of them when greedy)
    assert logprobs["text_offset"][0] == 0
    assert_joined_tokens_give_the_text(logprobs["tokens"], choice["text"], choice["finish_reason"])


def assert_joined_tokens_give_the_text(tokens: list[str], text: str, finish_reason: str) -> None:
    # The tiny random model emits bytes that form no character: Detokenize writes U+FFFD for them,
    # vLLM gives such a token the text "" (and a character split over tokens to the one completing it).
    text = text.replace("\ufffd", "")
    joined = "".join(tokens)
    # A final end-of-sequence token is listed (as vLLM's server does) but is not in the text.
    assert joined == text if finish_reason == "length" else joined.startswith(text)
