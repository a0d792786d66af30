"""The vLLM engine stage as a plain Ray Data UDF (no Dagster), on the real CPU engine."""

import json

import pytest

from llm_assets.engines.vllm import compat as vllm_compat
from llm_assets.engines.vllm.replica import vLLMEngineStage
from llm_assets.rows import ERROR_COLUMN

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def engine_outputs(tiny_model, ray_session):
    import ray.data

    rows = [
        {
            "row_id": f"r{i}",
            "tokenized_prompt": [5 + (i + j) % 200 for j in range(3 + i % 7)],
            "sampling_params": json.dumps({"max_tokens": 6, "ignore_eos": True, "temperature": 0}),
        }
        for i in range(40)
    ]
    # Requests vLLM refuses, one row each: too long for the model, empty, invalid sampling params.
    rows.append({"row_id": "too-long", "tokenized_prompt": [7] * (MAX_MODEL_LEN + 10), "sampling_params": None})
    rows.append({"row_id": "empty", "tokenized_prompt": [], "sampling_params": None})
    rows.append(
        {"row_id": "bad-params", "tokenized_prompt": [5, 6, 7], "sampling_params": json.dumps({"temperature": -1.0})}
    )
    dataset = ray.data.from_items(rows).map_batches(
        vLLMEngineStage,
        fn_constructor_kwargs={
            "model_source": tiny_model,
            "engine_kwargs": vllm_compat.platform_engine_kwargs({"max_model_len": MAX_MODEL_LEN}, on_gpu=False),
            "should_continue_on_error": True,
            "engine_detokenizes": True,
        },
        batch_size=16,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
        runtime_env={"env_vars": vllm_compat.engine_actor_env(on_gpu=False)},
    )
    return {row["row_id"]: row for row in dataset.take_all()}


def test_every_row_comes_back_once_with_ray_data_llm_columns(engine_outputs):
    assert sorted(engine_outputs) == sorted([f"r{i}" for i in range(40)] + ["too-long", "empty", "bad-params"])
    row = engine_outputs["r3"]
    assert row["num_generated_tokens"] == 6 and len(row["generated_tokens"]) == 6
    assert row["num_input_tokens"] == 3 + 3 % 7
    assert row["time_taken_llm"] > 0
    assert isinstance(row["generated_text"], str)
    assert row["finish_reason"] == "length"
    assert row[ERROR_COLUMN] == ""
    assert "tokenized_prompt" not in row  # persisted by Tokenize; not copied again


def test_a_failing_row_is_kept_with_its_error_when_continuing_on_error(engine_outputs):
    failed = engine_outputs["too-long"]
    assert failed[ERROR_COLUMN] and failed[ERROR_COLUMN].split(":")[0].endswith("Error")
    assert str(MAX_MODEL_LEN) in failed[ERROR_COLUMN]
    assert failed["generated_tokens"] is None
    assert "empty" in engine_outputs["empty"][ERROR_COLUMN].lower()
    assert "temperature" in engine_outputs["bad-params"][ERROR_COLUMN]
    assert [row_id for row_id, row in engine_outputs.items() if row[ERROR_COLUMN]] == [
        "too-long",
        "empty",
        "bad-params",
    ]


def engine_host(model: str, task_type: str = "generate"):
    """A vLLM engine stage in a Ray actor, as the engine pool hosts one (should_continue_on_error).
    Its ``process(batch, break_engine)`` gives the output rows, or the error that failed the batch.
    Fault injection with ``break_engine``: a real engine cannot be made to fail mid-step on demand,
    so its step function is replaced by one that raises what a GPU fault raises."""
    import ray

    @ray.remote(num_cpus=1, runtime_env={"env_vars": vllm_compat.engine_actor_env(on_gpu=False)})
    class Host:
        def __init__(self):
            kwargs = vllm_compat.platform_engine_kwargs({"max_model_len": MAX_MODEL_LEN}, on_gpu=False)
            self.stage = vLLMEngineStage(model, kwargs, task_type=task_type, should_continue_on_error=True)

        async def process(self, batch, break_engine: bool = False):
            if break_engine:

                def broken_step():
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")

                self.stage.engine._engine.step = broken_step
            try:
                output = await self.stage.process(batch)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return output.to_pylist()

    return Host.remote()


def test_a_dead_engine_is_never_reported_as_row_errors(tiny_model, ray_session):
    """Even with should_continue_on_error, an engine that fails (not a request) fails the batch
    with EngineDeadError."""
    import pyarrow as pa
    import ray

    batch = pa.table({"row_id": ["a", "b"], "tokenized_prompt": [[5, 6], [7, 8]], "sampling_params": [None, None]})
    host = engine_host(tiny_model)
    assert [row[ERROR_COLUMN] for row in ray.get(host.process.remote(batch))] == ["", ""]  # a healthy engine first
    broken = ray.get(host.process.remote(batch, True))
    assert broken.startswith("EngineDeadError") and "illegal memory access" in broken
    assert ray.get(host.process.remote(batch)).startswith("EngineDeadError")  # it stays dead
    ray.kill(host)


@pytest.fixture(scope="module")
def embed_host(minilm, ray_session):
    import ray

    host = engine_host(minilm, task_type="embed")
    yield host
    ray.kill(host)


def test_embedding_rows_the_engine_refuses_fail_alone_within_their_batch(embed_host):
    """Pooling rows reach the engine as one group per batch: a refused row fails alone, in place."""
    import pyarrow as pa
    import ray

    tokens = [[101, 7592 + i, 2088, 102] for i in range(6)]
    tokens[2] = [101] + [7592] * (MAX_MODEL_LEN + 10) + [102]  # too long for the model
    tokens[4] = []  # empty
    batch = pa.table({"row_id": [f"r{i}" for i in range(6)], "tokenized_prompt": tokens, "pooling_params": [None] * 6})
    rows = ray.get(embed_host.process.remote(batch))
    assert [row["row_id"] for row in rows] == [f"r{i}" for i in range(6)]
    assert [bool(row[ERROR_COLUMN]) for row in rows] == [False, False, True, False, True, False]
    assert str(MAX_MODEL_LEN) in rows[2][ERROR_COLUMN] and rows[2]["embeddings"] is None
    for row in (rows[0], rows[1], rows[3], rows[5]):
        assert len(row["embeddings"]) == 384 and row["num_input_tokens"] == 4
    assert rows[0]["embeddings"] != rows[1]["embeddings"]  # each row its own vector, in its own place


def test_a_dead_embedding_engine_fails_the_whole_batch(embed_host):
    import pyarrow as pa
    import ray

    batch = pa.table(
        {"row_id": ["a", "b"], "tokenized_prompt": [[101, 2088, 102], [101, 7592, 102]], "pooling_params": [None, None]}
    )
    broken = ray.get(embed_host.process.remote(batch, True))
    assert broken.startswith("EngineDeadError") and "illegal memory access" in broken
