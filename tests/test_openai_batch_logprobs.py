"""OpenAI Batch lines asking for log probabilities: the request fields -> vLLM's ``logprobs``, and the
engine's logprobs column -> OpenAI's chat / completions ``logprobs`` objects. Pure Python; the real
engine run is in test_openai_batch_run.py."""

import json

import pyarrow as pa
import pytest

from llm_assets.engines.base import LOGPROB
from llm_assets.openai_batch import rows_from_openai_batch
from llm_assets.rows import loads_params
from llm_assets.sources import LocalFolderSource, SourceError
from tests.helpers.openai_batch import CHAT, COMPLETIONS, export, finished, request, rows
from tests.helpers.stages import preprocess_stage

# --- requests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "vllm_logprobs"),
    [
        (request(logprobs=True, top_logprobs=3), 3),
        (request(logprobs=True), 0),  # the sampled token only, with an empty top_logprobs
        (request(logprobs=True, top_logprobs=20), 20),
        (request(logprobs=False), None),
        (request(logprobs=False, top_logprobs=0), None),
        (request(url=COMPLETIONS, logprobs=5), 5),
        (request(url=COMPLETIONS, logprobs=0), 0),
    ],
)
def test_a_logprobs_request_becomes_vllm_logprobs(line, vllm_logprobs):
    params = rows(line)[0]["sampling_params"] or {}
    assert params.get("logprobs") == vllm_logprobs
    # The engine then detokenizes those rows, so each entry has its token's text.
    assert params.get("detokenize") is (True if vllm_logprobs is not None else None)


def test_logprobs_rows_pass_preprocess_with_their_params(tmp_path):
    lines = [request("c", logprobs=True, top_logprobs=2, max_tokens=4), request("t", url=COMPLETIONS, logprobs=1)]
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = preprocess_stage()(pa.concat_tables(LocalFolderSource(str(tmp_path)).read("batch.jsonl"))).to_pylist()
    assert [loads_params(row["sampling_params"]) for row in out] == [
        {"detokenize": True, "logprobs": 2, "max_tokens": 4},
        {"detokenize": True, "logprobs": 1},
    ]


def test_bad_logprobs_lines_are_all_named_with_their_line_and_field():
    with pytest.raises(SourceError) as raised:
        list(
            rows_from_openai_batch(
                enumerate(
                    [
                        request("ok", logprobs=True, top_logprobs=1),
                        request("a", top_logprobs=2),
                        request("b", url=COMPLETIONS, logprobs=9),
                    ],
                    start=1,
                ),
                "batch.jsonl",
            )
        )
    assert str(raised.value) == (
        "batch.jsonl: 2 bad request lines: line 2: body 'top_logprobs' is 2 but 'logprobs' is absent: set 'logprobs' "
        "to true to get them; line 3: body 'logprobs' is 9: expected an integer from 0 to 5"
    )


# --- results ------------------------------------------------------------------------------------


def entry(token_id, logprob, rank, text):
    return {"token_id": token_id, "logprob": logprob, "rank": rank, "decoded_token": text}


# Two generated tokens, " Paris" (id 7, the likeliest) then "é" (id 9, sampled at rank 4), asked
# with logprobs 2: vLLM's entries are the sampled token first, then the top 2 (a duplicate id once).
TOKENS = [7, 9]
LOGPROBS = [
    [entry(7, -0.25, 1, " Paris"), entry(8, -1.5, 2, " Lyon")],
    [entry(9, -3.0, 4, "é"), entry(10, -0.5, 1, "."), entry(11, -float("inf"), 2, "!")],
]


def logprob_row(row_id, url, top=2, **overrides):
    row = {
        **finished(row_id, " Parisé", url=url, tokens=(5, 2)),
        "generated_tokens": TOKENS,
        "logprobs": LOGPROBS,
        "sampling_params": json.dumps({"logprobs": top, "detokenize": True}),
        **overrides,
    }
    return row


def table(*rows_):
    # The engine's own column types, so the float32 logprobs and Parquet lists are what export reads.
    schema = pa.schema([("generated_tokens", pa.list_(pa.int32())), ("logprobs", pa.list_(pa.list_(LOGPROB)))])
    columns = {name: pa.array([row.get(name) for row in rows_], type=schema.field(name).type) for name in schema.names}
    others = pa.Table.from_pylist([{k: v for k, v in row.items() if k not in columns} for row in rows_])
    for name, column in columns.items():
        others = others.append_column(name, column)
    return others


def test_chat_logprobs_have_openai_content_entries(tmp_path):
    _, output, errors = export(
        tmp_path, [table(logprob_row("c", CHAT), logprob_row("plain", CHAT, sampling_params=None, logprobs=None))]
    )
    assert errors == []
    choice = output[0]["response"]["body"]["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None
    assert content[0] == {
        "token": " Paris",
        "logprob": -0.25,
        "bytes": list(b" Paris"),
        "top_logprobs": [
            {"token": " Paris", "logprob": -0.25, "bytes": list(b" Paris")},
            {"token": " Lyon", "logprob": -1.5, "bytes": list(b" Lyon")},
        ],
    }
    # The sampled token outside the top 2 is the position's token, not one of its top_logprobs;
    # -inf (which JSON cannot hold) is OpenAI's -9999.0; bytes are UTF-8 ("é" is two bytes).
    assert (content[1]["token"], content[1]["logprob"], content[1]["bytes"]) == ("é", -3.0, [0xC3, 0xA9])
    assert [(top["token"], top["logprob"]) for top in content[1]["top_logprobs"]] == [(".", -0.5), ("!", -9999.0)]
    assert "".join(position["token"] for position in content) == choice["message"]["content"]
    assert output[1]["response"]["body"]["choices"][0]["logprobs"] is None  # a row that did not ask

    from openai.types.chat import ChatCompletion  # the OpenAI client parses the body

    parsed = ChatCompletion.model_validate(output[0]["response"]["body"]).choices[0].logprobs.content
    assert [len(position.top_logprobs) for position in parsed] == [2, 2]


def test_top_logprobs_0_gives_the_sampled_token_alone(tmp_path):
    sampled_only = [[entry(7, -0.25, 1, " Paris")], [entry(9, -3.0, 4, "é")]]
    _, output, _ = export(tmp_path, [table(logprob_row("c", CHAT, top=0, logprobs=sampled_only))])
    content = output[0]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert [(position["token"], position["top_logprobs"]) for position in content] == [(" Paris", []), ("é", [])]


def test_completion_logprobs_have_openai_lists(tmp_path):
    _, output, _ = export(tmp_path, [table(logprob_row("t", COMPLETIONS))])
    choice = output[0]["response"]["body"]["choices"][0]
    assert choice["logprobs"] == {
        "tokens": [" Paris", "é"],
        "token_logprobs": [-0.25, -3.0],
        # The N most likely and the sampled token, as OpenAI documents (up to N+1 per position).
        "top_logprobs": [{" Paris": -0.25, " Lyon": -1.5}, {".": -0.5, "!": -9999.0, "é": -3.0}],
        "text_offset": [0, 6],
    }
    from openai.types import Completion

    assert Completion.model_validate(output[0]["response"]["body"]).choices[0].logprobs.tokens == [" Paris", "é"]


def test_a_row_that_asked_and_got_no_logprobs_is_a_failed_request(tmp_path):
    counts, output, errors = export(tmp_path, [table(logprob_row("c", CHAT, logprobs=None), logprob_row("ok", CHAT))])
    assert counts == {"total": 2, "completed": 1, "failed": 1}
    assert errors[0]["custom_id"] == "c" and errors[0]["response"]["status_code"] == 500
    assert errors[0]["response"]["body"]["error"]["message"] == (
        "the request asked for log probabilities, but the engine returned no logprobs"
    )


def test_logprobs_that_do_not_match_the_tokens_fail_the_export_naming_the_row(tmp_path):
    with pytest.raises(
        ValueError, match=r"^row 'c': the logprobs of generated token 1 do not include it \(token id 12\)"
    ):
        export(tmp_path, [table(logprob_row("c", CHAT, generated_tokens=[7, 12]))])
    with pytest.raises(ValueError, match=r"^row 'c': 1 logprobs positions for 2 generated tokens"):
        export(tmp_path, [table(logprob_row("c", CHAT, logprobs=LOGPROBS[:1]))])
