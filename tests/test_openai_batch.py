"""OpenAI Batch API files: request lines -> pipeline rows, finished rows -> output and error files.
Pure Python (no engine); the S3 test uses the local moto server."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from llm_assets import openai_batch
from llm_assets.openai_batch import (
    export_openai_batch,
    is_openai_batch_line,
    rows_from_openai_batch,
)
from llm_assets.rows import loads_params
from llm_assets.sources import LocalFolderSource, SourceError
from tests.helpers.openai_batch import (
    CHAT,
    COMPLETIONS,
    CREATED,
    RESPONSES,
    export,
    finished,
    read_lines,
    request,
    rows,
)
from tests.helpers.stages import preprocess_stage


def one_row(obj):
    return rows(obj)[0]


# --- input --------------------------------------------------------------------------------------


def test_chat_request_becomes_a_messages_row_with_vllm_sampling_params():
    row = one_row(
        request(
            "q-1",
            model="gpt-4o-mini",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ann"}],
            max_completion_tokens=64,
            temperature=1,
            top_p=0.9,
            stop="\n",
            seed=7,
            presence_penalty=0.5,
            frequency_penalty=-1,
            n=1,
            logprobs=False,
            top_logprobs=0,
            stream=False,
            user="u-1",
            metadata={"team": "x"},
        )
    )
    assert row == {
        "row_id": "q-1",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "sampling_params": {
            "max_tokens": 64,
            "temperature": 1.0,
            "top_p": 0.9,
            "stop": ["\n"],
            "seed": 7,
            "presence_penalty": 0.5,
            "frequency_penalty": -1.0,
        },
        "openai_url": CHAT,
        "openai_model": "gpt-4o-mini",
    }
    # One type per field, whatever the JSON spelling: the rows make one Arrow column.
    assert isinstance(row["sampling_params"]["temperature"], float)


def test_completions_request_becomes_a_prompt_row():
    row = one_row(request("c", COMPLETIONS, prompt="Once upon a time", max_tokens=16, stop=["\n", "."]))
    assert row == {
        "row_id": "c",
        "prompt": "Once upon a time",
        "sampling_params": {"max_tokens": 16, "stop": ["\n", "."]},
        "openai_url": COMPLETIONS,
        "openai_model": None,
    }


def test_responses_string_input_is_a_user_message_after_the_instructions():
    row = one_row(
        request("r", RESPONSES, input="Name a color.", instructions="Answer in one word.", max_output_tokens=8)
    )
    assert row["messages"] == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a color."},
    ]
    assert row["sampling_params"] == {"max_tokens": 8}
    assert "prompt" not in row


def test_responses_message_list_with_text_parts_is_joined_into_text():
    row = one_row(
        request(
            "r",
            RESPONSES,
            input=[
                {"type": "message", "role": "developer", "content": "Be terse."},
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Hello, "}, {"type": "input_text", "text": "world"}],
                },
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]},
            ],
        )
    )
    assert row["messages"] == [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Hello, world"},
        {"role": "assistant", "content": "Hi."},
    ]
    assert row["sampling_params"] is None


def test_is_openai_batch_line():
    assert is_openai_batch_line(request())
    assert not is_openai_batch_line({"messages": [], "row_id": "x"})
    assert not is_openai_batch_line({"custom_id": "a", "body": {}})
    assert not is_openai_batch_line(["custom_id", "url", "body"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            {"custom_id": "a", "method": "POST", "url": CHAT, "body": {"model": "m"}},
            "body has neither 'messages', 'prompt' nor 'input'",
        ),
        ({**request(), "method": "GET"}, "method 'GET': expected 'POST'"),
        (
            request(url="/v1/embeddings", input=["a", "b"]),
            "body 'input' is ['a', 'b']: expected one non-empty string (one text per request line)",
        ),
        (
            request(url="/v1/embeddings", input="x", encoding_format="base64"),
            "body 'encoding_format' is 'base64': only 'float' is written",
        ),
        (request(url="/v1/embeddings", input="x", dimensions=0), "body 'dimensions' is 0: expected an integer >= 1"),
        (
            request(url="/v1/moderations", input="x"),
            "url '/v1/moderations' is not supported (expected one of '/v1/chat/completions', '/v1/completions', "
            "'/v1/responses', '/v1/embeddings')",
        ),
        (
            {"custom_id": "a", "url": CHAT, "body": {}},
            "'method' is missing: a batch request line needs custom_id, method, url, body",
        ),
        (
            {**request(), "extra": 1},
            "unknown field 'extra': a batch request line has only custom_id, method, url, body",
        ),
        (request(custom_id=""), "'custom_id' is '': expected a non-empty string"),
        (request(custom_id=7), "'custom_id' is 7: expected a non-empty string"),
        ({**request(), "body": []}, "'body' is list: expected a JSON object"),
        (request(url=CHAT, prompt="x"), "body has 'prompt', but url '/v1/chat/completions' takes 'messages'"),
        (
            request(tools=[]),
            (
                "body field 'tools' is not supported for /v1/chat/completions (supported: frequency_penalty, "
                "logprobs, max_completion_tokens, max_tokens, messages, metadata, model, presence_penalty, seed, stop, "
                "temperature, top_logprobs, top_p, user; and only at their defaults: n=1, stream=false)"
            ),
        ),
        (
            request(url=RESPONSES, stop="x"),
            (
                "body field 'stop' is not supported for /v1/responses (supported: input, instructions, "
                "max_output_tokens, metadata, model, temperature, top_p, user; and only at their defaults: "
                "top_logprobs=0, stream=false)"
            ),
        ),
        (request(stream=True), "body 'stream' is true: a batch request cannot stream (expected false or absent)"),
        (request(n=3), "body 'n' is 3: expected 1 or absent (one generation per request)"),
        (
            request(top_logprobs=5),
            "body 'top_logprobs' is 5 but 'logprobs' is absent: set 'logprobs' to true to get them",
        ),
        (
            request(logprobs=False, top_logprobs=1),
            "body 'top_logprobs' is 1 but 'logprobs' is false: set 'logprobs' to true to get them",
        ),
        (request(logprobs=True, top_logprobs=21), "body 'top_logprobs' is 21: expected an integer from 0 to 20"),
        (request(logprobs=True, top_logprobs=-1), "body 'top_logprobs' is -1: expected an integer from 0 to 20"),
        (request(logprobs=True, top_logprobs=2.0), "body 'top_logprobs' is 2.0: expected an integer from 0 to 20"),
        (request(logprobs=1), "body 'logprobs' is 1: expected true or false"),
        (request(url=COMPLETIONS, logprobs=6), "body 'logprobs' is 6: expected an integer from 0 to 5"),
        (request(url=COMPLETIONS, logprobs=True), "body 'logprobs' is true: expected an integer from 0 to 5"),
        (
            request(url=COMPLETIONS, logprobs=1, top_logprobs=1),
            (
                "body field 'top_logprobs' is not supported for /v1/completions "
                "(supported: frequency_penalty, logprobs, "
                "max_tokens, metadata, model, presence_penalty, prompt, seed, stop, temperature, top_p, user; "
                "and only at their defaults: n=1, stream=false)"
            ),
        ),
        (
            request(url=RESPONSES, top_logprobs=3),
            "body 'top_logprobs' is 3: log probabilities of /v1/responses are not returned by this pipeline "
            "(expected 0 or absent)",
        ),
        (
            request(max_tokens=10, max_completion_tokens=20),
            "body 'max_tokens' 10 and 'max_completion_tokens' 20 differ; give one of them",
        ),
        (request(max_completion_tokens=0), "body 'max_completion_tokens' is 0: expected an integer >= 1"),
        (request(url=RESPONSES, max_output_tokens="8"), "body 'max_output_tokens' is '8': expected an integer >= 1"),
        (request(temperature="hot"), "body 'temperature' is 'hot': expected a number >= 0 and <= 2"),
        (request(temperature=2.5), "body 'temperature' is 2.5: expected a number >= 0 and <= 2"),
        (request(top_p=0), "body 'top_p' is 0: expected a number > 0 and <= 1"),
        (request(presence_penalty=True), "body 'presence_penalty' is true: expected a number >= -2 and <= 2"),
        (request(seed=1.5), "body 'seed' is 1.5: expected an integer"),
        (request(stop=["a", 1]), "body 'stop' is ['a', 1]: expected a string or a list of strings"),
        (request(model=5), "body 'model' is 5: expected a string"),
        (
            request(messages=[]),
            "body 'messages' is []: expected a non-empty list of {'role': ..., 'content': ...} objects",
        ),
        (
            request(messages=[{"role": "user"}]),
            "body messages[0] is {'role': 'user'}: expected {'role': ..., 'content': ...}",
        ),
        (
            request(messages=[{"role": "robot", "content": "x"}]),
            "body messages[0] role 'robot' is not one of ['assistant', 'developer', 'system', 'tool', 'user']",
        ),
        (
            request(messages=[{"role": "assistant", "content": "", "tool_calls": []}]),
            "body messages[0] has 'tool_calls': only 'role' and 'content' are supported",
        ),
        (
            request(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "body messages[0] content part 'image_url' is not supported (text parts only)",
        ),
        (
            request(messages=[{"role": "user", "content": None}]),
            "body messages[0] content is null: expected a string or a list of text parts",
        ),
        (
            request(url=COMPLETIONS, prompt=["a", "b"]),
            "body 'prompt' is ['a', 'b']: expected a non-empty string (one prompt per request)",
        ),
        (request(url=RESPONSES, input=3), "body 'input' is 3: expected a string or a list of messages"),
        (
            request(url=RESPONSES, input=[{"type": "function_call_output", "role": "tool", "content": "x"}]),
            "body input[0] has type 'function_call_output': only messages are supported",
        ),
        (request(url=RESPONSES, instructions=["x"]), "body 'instructions' is ['x']: expected a string"),
    ],
)
def test_a_bad_request_line_names_the_file_line_and_what_was_expected(line, message):
    with pytest.raises(SourceError) as raised:
        rows(request("first"), line)
    assert str(raised.value) == f"batch.jsonl: line 2: {message}"


def test_a_repeated_custom_id_names_both_lines():
    with pytest.raises(SourceError) as raised:
        rows(request("a"), request("b"), request("a"))
    assert str(raised.value) == "batch.jsonl: line 3: 'custom_id' 'a' repeats line 1; custom_id must be unique"


def test_rows_come_lazily_so_a_reader_can_chunk_them():
    lines = iter([(1, request("a")), (2, request("b")), (3, {"not": "a request"})])
    produced = rows_from_openai_batch(lines, "batch.jsonl")
    assert next(produced)["row_id"] == "a"
    assert next(produced)["row_id"] == "b"
    with pytest.raises(SourceError, match="^batch.jsonl: line 3: unknown field 'not'"):
        next(produced)


def write_lines(path: Path, objects: list) -> Path:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects))
    return path


def test_a_batch_file_reads_through_the_source_and_passes_preprocess(tmp_path):
    write_lines(
        tmp_path / "batch.jsonl",
        [
            request("chat", model="m", max_tokens=5, stop="x"),
            request("text", COMPLETIONS, prompt="Once", temperature=0.5, stop=["y", "z"]),
            request("resp", RESPONSES, input="Hello", instructions="Be nice"),
        ],
    )
    table = pa.concat_tables(LocalFolderSource(str(tmp_path)).read("batch.jsonl"))
    assert table.column("row_id").to_pylist() == ["chat", "text", "resp"]
    out = preprocess_stage()(table).to_pylist()
    # What the engine stage passes to SamplingParams (Arrow filled the fields a row lacks with nulls).
    assert [loads_params(r["sampling_params"]) for r in out] == [
        {"max_tokens": 5, "stop": ["x"]},
        {"stop": ["y", "z"], "temperature": 0.5},
        {},
    ]
    assert [r["openai_url"] for r in out] == [CHAT, COMPLETIONS, RESPONSES]


def test_a_bad_line_in_a_batch_file_fails_the_read_with_its_path_and_line(tmp_path):
    path = write_lines(tmp_path / "batch.jsonl", [request("a"), request("b", url="/v1/moderations", input="x")])
    with pytest.raises(SourceError) as raised:
        list(LocalFolderSource(str(tmp_path)).read("batch.jsonl"))
    assert str(raised.value).startswith(f"{path}: line 2: url '/v1/moderations' is not supported")


# --- output -------------------------------------------------------------------------------------


def test_export_writes_openai_output_lines(tmp_path):
    batch = pa.Table.from_pylist(
        [finished("a", "Paris.", tokens=(12, 3)), finished("b", "Lyon", finish_reason="length")]
    )
    counts, output, errors = export(tmp_path, [batch])
    assert counts == {"total": 2, "completed": 2, "failed": 0}
    assert errors == []
    first = output[0]
    assert first["id"].startswith("batch_req_") and first["custom_id"] == "a" and first["error"] is None
    assert first["response"]["status_code"] == 200 and len(first["response"]["request_id"]) == 32
    body = first["response"]["body"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert (body["created"], body["model"]) == (CREATED, "default-model")  # the model that answered, not the request's
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris.", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert output[1]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["errors.jsonl", "output.jsonl"]


def test_each_endpoint_gets_its_own_response_object(tmp_path):
    batch = pa.Table.from_pylist(
        [
            finished("chat", "A"),
            finished("text", "B", url=COMPLETIONS),
            finished("resp", "C", url=RESPONSES, tokens=(4, 6)),
            finished("cut", "D", url=RESPONSES, finish_reason="length"),
        ]
    )
    _, output, _ = export(tmp_path, [batch])
    bodies = {line["custom_id"]: line["response"]["body"] for line in output}
    assert bodies["text"]["object"] == "text_completion"
    assert bodies["text"]["choices"] == [{"index": 0, "text": "B", "logprobs": None, "finish_reason": "stop"}]
    response = bodies["resp"]
    assert (response["object"], response["status"], response["created_at"]) == ("response", "completed", CREATED)
    assert response["output"][0]["content"] == [{"type": "output_text", "text": "C", "annotations": []}]
    assert response["usage"]["input_tokens"] == 4 and response["usage"]["output_tokens"] == 6
    assert response["usage"]["total_tokens"] == 10
    assert bodies["cut"]["status"] == "incomplete"
    assert bodies["cut"]["incomplete_details"] == {"reason": "max_output_tokens"}

    # The bodies parse as the OpenAI client's own types.
    types = pytest.importorskip("openai.types")
    from openai.types.chat import ChatCompletion
    from openai.types.responses import Response

    assert ChatCompletion.model_validate(bodies["chat"]).choices[0].message.content == "A"
    assert types.Completion.model_validate(bodies["text"]).choices[0].text == "B"
    assert Response.model_validate(response).output_text == "C"


def test_failed_rows_go_to_the_error_file_only(tmp_path):
    batches = [
        pa.Table.from_pylist(
            [
                finished("ok-1"),
                finished("bad", error="ValueError: This model's maximum context length is 512 tokens. (prompt: 'x')"),
            ]
        ),
        pa.Table.from_pylist([finished("ok-2"), finished("aborted", finish_reason="abort")]),
    ]
    counts, output, errors = export(tmp_path, iter(batches))
    assert counts == {"total": 4, "completed": 2, "failed": 2}
    assert [line["custom_id"] for line in output] == ["ok-1", "ok-2"]
    # OpenAI's shape of a failed request: a status and an error body, never the prompt.
    assert errors == [
        {
            "id": errors[0]["id"],
            "custom_id": "bad",
            "error": None,
            "response": {
                "status_code": 400,
                "request_id": errors[0]["response"]["request_id"],
                "body": {
                    "error": {
                        "message": "ValueError: This model's maximum context length is 512 tokens.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "context_length_exceeded",
                    }
                },
            },
        },
        {
            "id": errors[1]["id"],
            "custom_id": "aborted",
            "error": None,
            "response": {
                "status_code": 500,
                "request_id": errors[1]["response"]["request_id"],
                "body": {
                    "error": {
                        "message": "the engine stopped the request before it finished (finish_reason 'abort')",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
            },
        },
    ]
    assert errors[0]["id"].startswith("batch_req_")


def test_rows_without_openai_columns_export_as_chat_completions_of_the_default_model(tmp_path):
    batch = pa.Table.from_pylist([finished("a")]).drop_columns(["openai_url", "openai_model", "__inference_error__"])
    _, output, _ = export(tmp_path, [batch], default_model="my-model")
    body = output[0]["response"]["body"]
    assert (body["object"], body["model"]) == ("chat.completion", "my-model")


def test_an_unknown_openai_url_in_the_rows_is_refused(tmp_path):
    with pytest.raises(ValueError, match="^row 'a': openai_url '/v1/moderations' is not one of /v1/chat/completions, "):
        export(tmp_path, [pa.Table.from_pylist([finished("a", url="/v1/moderations")])])


def test_ids_are_stable_across_exports_and_differ_between_output_files(tmp_path):
    batch = pa.Table.from_pylist([finished("a")])
    _, first, _ = export(tmp_path, [batch])
    _, again, _ = export(tmp_path, [batch])
    _, other, _ = export(tmp_path / "other", [batch])
    assert first == again
    assert first[0]["id"] != other[0]["id"]
    assert first[0]["response"]["request_id"] != other[0]["response"]["request_id"]


def test_an_export_replaces_both_files_whole(tmp_path):
    export(tmp_path, [pa.Table.from_pylist([finished("a"), finished("b", error="boom")])])
    counts, output, errors = export(tmp_path, [pa.Table.from_pylist([finished("a"), finished("b")])])
    assert counts["failed"] == 0
    assert [line["custom_id"] for line in output] == ["a", "b"]
    assert errors == []  # the earlier attempt's error line is gone


def failing_batches():
    yield pa.Table.from_pylist([finished("new")])
    raise RuntimeError("upstream read failed")


def test_a_failed_export_leaves_the_previous_files_and_no_temporary_ones(tmp_path):
    export(tmp_path, [pa.Table.from_pylist([finished("old")])])
    with pytest.raises(RuntimeError, match="upstream read failed"):
        export(tmp_path, failing_batches())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["errors.jsonl", "output.jsonl"]
    assert [line["custom_id"] for line in read_lines(tmp_path / "out" / "output.jsonl")] == ["old"]


def test_an_export_needs_the_final_stage_columns(tmp_path):
    batch = pa.Table.from_pylist([{"row_id": "a", "answer": "x"}])
    with pytest.raises(ValueError, match=r"the rows have no \['generated_text', 'num_input_tokens', "):
        export(tmp_path, [batch])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_on_an_object_store_each_file_is_written_in_one_go(tmp_path, monkeypatch):
    # Treat the local filesystem as an object store: no temporary name, nothing visible before the end.
    monkeypatch.setattr(openai_batch.files, "_OBJECT_STORES", {"local"})
    output = tmp_path / "out" / "output.jsonl"
    seen_during_export = []

    def batches():
        yield pa.Table.from_pylist([finished("a")])
        seen_during_export.append(sorted(p.name for p in tmp_path.rglob("*")))
        yield pa.Table.from_pylist([finished("b", error="boom")])

    (tmp_path / "out").mkdir()
    counts = export_openai_batch(
        batches(), pafs.LocalFileSystem(), str(output), str(tmp_path / "out" / "errors.jsonl"), "m"
    )
    assert seen_during_export == [["out"]]
    assert counts == {"total": 2, "completed": 1, "failed": 1}
    assert [line["custom_id"] for line in read_lines(output)] == ["a"]


def test_export_to_s3(s3_endpoint):
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test-key-id",
        aws_secret_access_key="test-secret-key-not-for-logs",
    )
    client.create_bucket(Bucket="exports")
    filesystem = pafs.S3FileSystem(
        endpoint_override=s3_endpoint,
        region="us-east-1",
        access_key="test-key-id",
        secret_key="test-secret-key-not-for-logs",
        allow_bucket_creation=False,
    )
    batch = pa.Table.from_pylist([finished("a"), finished("b", error="boom")])
    counts = export_openai_batch([batch], filesystem, "exports/run/output.jsonl", "exports/run/errors.jsonl", "m")
    assert counts == {"total": 2, "completed": 1, "failed": 1}
    keys = sorted(entry["Key"] for entry in client.list_objects_v2(Bucket="exports")["Contents"])
    assert keys == ["run/errors.jsonl", "run/output.jsonl"]
    body = client.get_object(Bucket="exports", Key="run/output.jsonl")["Body"].read().decode()
    assert [json.loads(line)["custom_id"] for line in body.splitlines()] == ["a"]


def test_round_trip_from_request_file_to_output_file(tmp_path):
    requests = [request("chat-1", model="gpt-4o-mini"), request("text-1", COMPLETIONS), request("resp-1", RESPONSES)]
    (tmp_path / "in").mkdir()
    write_lines(tmp_path / "in" / "batch.jsonl", requests)
    table = pa.concat_tables(LocalFolderSource(str(tmp_path / "in")).read("batch.jsonl"))
    # What the engine and Detokenize add to each row.
    engine_output = table.append_column("generated_text", pa.array(["x", "y", "z"]))
    engine_output = engine_output.append_column("num_input_tokens", pa.array([3, 4, 5], pa.int32()))
    engine_output = engine_output.append_column("num_generated_tokens", pa.array([1, 1, 1], pa.int32()))
    engine_output = engine_output.append_column("finish_reason", pa.array(["stop"] * 3))
    _, output, errors = export(tmp_path, [engine_output])
    assert [
        (line["custom_id"], line["response"]["body"]["object"], line["response"]["body"]["model"]) for line in output
    ] == [
        ("chat-1", "chat.completion", "default-model"),  # the model that answered, whatever the request named
        ("text-1", "text_completion", "default-model"),
        ("resp-1", "response", "default-model"),
    ]
    assert errors == []


def test_every_bad_line_of_a_file_is_named_in_one_error():
    objects = [
        request("a"),
        request("b", url="/v1/moderations", input="x"),
        request("c"),
        request("a"),
        {"custom_id": "d"},
    ]
    with pytest.raises(SourceError) as raised:
        rows(*objects)
    message = str(raised.value)
    assert message.startswith("batch.jsonl: 3 bad request lines: line 2: ")
    assert "; line 4: 'custom_id' 'a' repeats line 1" in message and "; line 5: " in message
    many = [request(f"x{i}", url="/v1/moderations", input="x") for i in range(25)]
    with pytest.raises(SourceError, match="25 bad request lines: .*; and 5 more bad line\\(s\\)$"):
        rows(*many)


def test_every_bad_line_of_a_batch_file_in_one_error_a_line_that_is_not_json_among_them(tmp_path):
    """A repeated custom_id (line 4), a line that is not JSON (line 6), a body without messages
    (line 9), in a 12-line file: one read names all three."""
    lines = [json.dumps(request(f"r{i}")) for i in range(12)]
    lines[3] = json.dumps(request("r0"))
    lines[5] = '{"custom_id": "r5", "method": "POST", "url": '
    lines[8] = json.dumps({"custom_id": "r8", "method": "POST", "url": CHAT, "body": {"model": "m"}})
    (tmp_path / "batch.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError) as raised:
        list(LocalFolderSource(str(tmp_path)).read("batch.jsonl"))
    message = str(raised.value)
    assert message.startswith(
        f"{tmp_path / 'batch.jsonl'}: 3 bad request lines: line 4: 'custom_id' 'r0' repeats line 1"
    ), message
    assert (
        "; line 6: invalid JSON: " in message
        and "; line 9: body has neither 'messages', 'prompt' nor 'input'" in message
    )
    # A first line that is not JSON does not hide what kind of file it is.
    (tmp_path / "batch.jsonl").write_text("\n".join(["not json", *lines[:3]]) + "\n")
    with pytest.raises(SourceError, match=r"batch.jsonl: line 1: invalid JSON: "):
        list(LocalFolderSource(str(tmp_path)).read("batch.jsonl"))
