"""The fake engine (``llm_assets.engines.fake``): what tests of orchestration run on instead of vLLM.
It must behave as an engine does where orchestration can tell: the same rows out, in order, with
the engine's columns; max_tokens honoured; the rows vLLM refuses refused; deterministic answers."""

import asyncio
import re
import time

import pyarrow as pa
import pytest

from llm_assets.engines.fake import FakeEngineProcessorConfig, FakeEngineReplica
from llm_assets.pipeline import LLMPipeline
from llm_assets.rows import ERROR_COLUMN, RowError
from llm_assets.sources import LocalFolderSource
from tests.helpers.data import questions, write_jsonl
from tests.helpers.pipelines import make_resources, read_output, run_job, to_answer, to_chat


def batch(*params: str, tokens=((5, 6, 7),)) -> pa.Table:
    rows = [
        {"row_id": f"r{i}", "tokenized_prompt": list(tokens[i % len(tokens)]), "sampling_params": p}
        for i, p in enumerate(params)
    ]
    return pa.Table.from_pylist(rows)


def test_answers_are_deterministic_honour_max_tokens_and_decode(fake_model):
    replica = FakeEngineReplica(fake_model, max_model_len=16)
    table = batch('{"max_tokens": 3}', '{"max_tokens": 5}', None, tokens=((5, 6, 7), (5, 6, 7), (8,)))
    first, second = (
        asyncio.run(replica.process(table)).drop_columns(["request_id", "time_taken_llm"]).to_pylist() for _ in range(2)
    )
    assert first == second  # the same prompt and params: the same answer, whatever the run
    assert [row["num_generated_tokens"] for row in first] == [3, 5, 16]  # 16: vLLM's default max_tokens
    assert first[0]["generated_tokens"] == first[1]["generated_tokens"][:3]
    assert first[2]["generated_tokens"][:3] != first[0]["generated_tokens"]  # another prompt, other tokens
    assert [row["row_id"] for row in first] == ["r0", "r1", "r2"] and "tokenized_prompt" not in first[0]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fake_model)
    assert all(isinstance(tokenizer.decode(row["generated_tokens"]), str) for row in first)


@pytest.mark.parametrize(
    "params, tokens, problem",
    [
        ('{"top_p": 5}', (1, 2), "top_p must be in (0, 1], got 5"),
        ('{"n": 2}', (1, 2), "n is 2"),
        ('{"temperature": -1}', (1, 2), "temperature must be >= 0"),
        (None, tuple(range(20)), "the prompt has 20 tokens, more than max_model_len 16"),
    ],
)
def test_rows_vllm_refuses_are_refused(fake_model, params, tokens, problem):
    with pytest.raises(RowError, match=re.escape(f"engine: row 'r0': FakeEngineError: {problem}")):
        asyncio.run(FakeEngineReplica(fake_model, max_model_len=16).process(batch(params, tokens=(tokens,))))
    kept = asyncio.run(
        FakeEngineReplica(fake_model, max_model_len=16, should_continue_on_error=True).process(
            batch(params, None, tokens=(tokens, (1, 2)))
        )
    )
    assert problem in kept.column(ERROR_COLUMN)[0].as_py() and kept.column(ERROR_COLUMN)[1].as_py() == ""


def test_pooling_tasks_get_a_vector_and_delays_hold_the_start_and_each_batch(fake_model):
    started = time.monotonic()
    replica = FakeEngineReplica(fake_model, task_type="embed", start_delay_s=0.3, batch_delay_s=0.2)
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    rows = asyncio.run(replica.process(batch(None, None, tokens=((1, 2), (3,))))).to_pylist()
    assert time.monotonic() - started >= 0.2
    assert len(rows[0]["embeddings"]) == 8 and rows[0]["embeddings"] != rows[1]["embeddings"]


def test_a_pipeline_on_the_fake_engine_runs_every_stage_through_dagster(tmp_path, fake_model, ray_session, instance):
    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(6))
    config = FakeEngineProcessorConfig(model_source=fake_model, batch_size=4, engine_kwargs={"max_model_len": 512})
    pipeline = LLMPipeline(
        "tiny", config, LocalFolderSource(str(tmp_path / "landing")), preprocess=to_chat, postprocess=to_answer
    )
    result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"})
    assert result.success
    rows = read_output(make_resources(tmp_path / "storage")["storage"].store(), "postprocess", "a.jsonl")
    assert sorted(r["row_id"] for r in rows) == [f"a.jsonl:{i}" for i in range(6)]
    assert all(r["tokens"] == 8 and isinstance(r["answer"], str) for r in rows)  # to_chat asks for 8 tokens
