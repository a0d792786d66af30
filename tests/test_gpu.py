"""GPU paths, run on the H100 test machine (vLLM's CUDA build); skipped elsewhere."""

import dagster as dg
import pytest

from llm_assets.demo import demo_pipeline
from llm_assets.testing import build_llama_model
from tests.test_pipeline_dagster import log_messages, make_resources, run_job

pytestmark = pytest.mark.gpu


def test_demo_pipeline_runs_its_engine_on_the_gpu_with_a_dummy_weight_llama(tmp_path, capsys):
    # A 1B-class Llama config; vLLM fills the weights with random values (no download).
    model = build_llama_model(
        tmp_path / "llama-1b",
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        vocab_size=32000,
        tokenizer_vocab=4096,
        dtype="bfloat16",
        with_weights=False,
    )
    pipeline = demo_pipeline(model_source=str(model), engine_kwargs={"load_format": "dummy", "max_model_len": 2048})
    resources = make_resources(tmp_path / "storage")
    with dg.instance_for_test() as instance:
        result = run_job(pipeline, resources, instance, {"dagster/partition": "prompts.jsonl"})
        assert result.success
        messages = log_messages(instance, result.run_id)
        engine = instance.get_latest_materialization_event(dg.AssetKey(["demo", "engine"])).asset_materialization
    with capsys.disabled():
        print("\n".join(m for m in messages if "engine" in m))
        print({k: v.value for k, v in engine.metadata.items()})
    assert any("1 GPU(s) each, GPU build" in m for m in messages)
    assert sum("vLLM engine 0 started in" in m for m in messages) == 1
    assert engine.metadata["rows_out"].value == 20
    assert engine.metadata["generated_tokens"].value > 0
