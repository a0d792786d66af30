"""GPU paths, run on the H100 test machine (vLLM's CUDA build); skipped elsewhere."""

import importlib.util

import dagster as dg
import pytest

from llm_assets.demo import DATA_DIR, demo_pipeline, to_answer, to_chat
from llm_assets.testing import build_llama_model
from tests.test_pipeline_dagster import log_messages, make_resources, run_job

pytestmark = pytest.mark.gpu


def llama_1b(folder):
    """A 1B-class Llama config; the engine fills the weights with random values (no download)."""
    return build_llama_model(
        folder,
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


def run_demo_partition(pipeline, storage_root, capsys, shown: str):
    """The bundled prompts through ``pipeline``: its log lines and the engine's materialization."""
    resources = make_resources(storage_root)
    with dg.instance_for_test() as instance:
        result = run_job(pipeline, resources, instance, {"dagster/partition": "prompts.jsonl"})
        assert result.success
        messages = log_messages(instance, result.run_id)
        engine = instance.get_latest_materialization_event(dg.AssetKey(["demo", "engine"])).asset_materialization
    with capsys.disabled():
        print("\n".join(m for m in messages if shown in m))
        print({k: v.value for k, v in engine.metadata.items()})
    return messages, engine, resources["storage"]


def test_demo_pipeline_runs_its_engine_on_the_gpu_with_a_dummy_weight_llama(tmp_path, capsys):
    model = llama_1b(tmp_path / "llama-1b")
    pipeline = demo_pipeline(model_source=str(model), engine_kwargs={"load_format": "dummy", "max_model_len": 2048})
    messages, engine, _ = run_demo_partition(pipeline, tmp_path / "storage", capsys, shown="engine")
    assert any("1 GPU(s) each, GPU build" in m for m in messages)
    assert sum("vLLM engine 0 started in" in m for m in messages) == 1
    assert engine.metadata["rows_out"].value == 20
    assert engine.metadata["generated_tokens"].value > 0
    # One GPU held from the engine actor's creation to its release: as long as the engine ran.
    assert engine.metadata["gpu_seconds"].value == engine.metadata["engine_seconds"].value > 0
    [placement] = engine.metadata["engine_placement"].value
    assert len(placement["gpu_ids"]) == 1 and any(f"GPU {placement['gpu_ids'][0]})" in m for m in messages)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="SGLang is not installed (pip install sglang==0.5.15)")
def test_a_partition_through_the_sglang_engine(tmp_path, capsys):
    """Token ids in (Tokenize), token ids out, text from Detokenize: the vLLM engine's columns."""
    from transformers import AutoTokenizer

    from llm_assets.config import SGLangEngineProcessorConfig
    from llm_assets.pipeline import LLMPipeline
    from llm_assets.sources import LocalFolderSource

    model = llama_1b(tmp_path / "llama-1b")
    config = SGLangEngineProcessorConfig(model_source=str(model), engine_kwargs={"load_format": "dummy", "context_length": 2048})
    pipeline = LLMPipeline("demo", config, LocalFolderSource(str(DATA_DIR)), preprocess=to_chat, postprocess=to_answer)
    messages, engine, storage = run_demo_partition(pipeline, tmp_path / "storage", capsys, shown="SGLang")
    assert sum("SGLang engine 0 started in" in m for m in messages) == 1
    assert engine.metadata["rows_out"].value == 20
    rows = [r for t in storage.read_committed("demo", "detokenize", "prompts.jsonl") for r in t.to_pylist()]
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    assert len(rows) == 20
    for row in rows:
        assert row["num_generated_tokens"] == len(row["generated_tokens"]) and 1 <= row["num_generated_tokens"] <= 64
        assert row["finish_reason"] in ("length", "stop") and row["num_input_tokens"] > 0
        assert row["generated_text"] == tokenizer.decode(row["generated_tokens"], skip_special_tokens=True)
