"""ray.data.llm's per-row inputs and outputs through a real run on the CPU engine:
``logprobs`` / ``prompt_logprobs`` columns for the rows that ask, ``request_id``, and each row's
``tokenization_kwargs`` applied by Tokenize."""

import pytest

from tests.helpers.data import write_jsonl
from tests.helpers.pipelines import make_pipeline, make_resources, run_job

pytestmark = pytest.mark.slow


def ask(row):
    params = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    out = {
        "question": row["question"],
        "messages": [{"role": "user", "content": row["question"]}],
        "sampling_params": params,
    }
    if row["kind"] == "logprobs":
        params.update(logprobs=2, prompt_logprobs=1)
    if row["kind"] == "truncated":
        out["tokenization_kwargs"] = {"truncation": True, "max_length": 8}
    return out


def keep(row):
    return {
        key: row[key]
        for key in ("question", "generated_tokens", "num_input_tokens", "logprobs", "prompt_logprobs", "request_id")
    }


def test_logprobs_request_ids_and_tokenization_kwargs(tmp_path, tiny_model, ray_session, instance):
    kinds = ["logprobs", "plain", "truncated", "logprobs", "plain"]
    write_jsonl(
        tmp_path / "landing" / "a.jsonl",
        [{"question": f"Question {i}: count the words one two three four", "kind": k} for i, k in enumerate(kinds)],
    )
    pipeline = make_pipeline(tmp_path / "landing", tiny_model, preprocess=ask, postprocess=keep)
    resources = make_resources(tmp_path / "storage")
    assert run_job(pipeline, resources, instance, {"dagster/partition": "a.jsonl"}).success
    storage = resources["storage"].store()
    rows = sorted(
        (r for t in storage.read_committed("tiny", "postprocess", "a.jsonl") for r in t.to_pylist()),
        key=lambda r: int(r["row_id"].split(":")[1]),
    )
    assert len({r["request_id"] for r in rows}) == len(rows) and all(r["request_id"] for r in rows)
    for row, kind in zip(rows, kinds):
        if kind != "logprobs":
            assert row["logprobs"] is None and row["prompt_logprobs"] is None
            continue
        assert len(row["logprobs"]) == len(row["generated_tokens"]) == 4
        for token, position in zip(row["generated_tokens"], row["logprobs"]):
            assert 1 <= len(position) <= 3 and all(entry["logprob"] <= 0 for entry in position)
            best = next(entry for entry in position if entry["rank"] == 1)
            assert best["token_id"] == token  # greedy: the generated token is the most likely one
        assert len(row["prompt_logprobs"]) == row["num_input_tokens"] and row["prompt_logprobs"][0] is None
    truncated = rows[kinds.index("truncated")]
    assert truncated["num_input_tokens"] == 8 and rows[kinds.index("plain")]["num_input_tokens"] > 8
    tokenized = {r["row_id"]: r for t in storage.read_committed("tiny", "tokenize", "a.jsonl") for r in t.to_pylist()}
    assert len(tokenized[truncated["row_id"]]["tokenized_prompt"]) == 8
