"""Multi-LoRA on vLLM's CPU build: two adapters built offline for the tiny model (random, non-zero
A and B matrices, so each really changes the output) and the base model, mixed in one partition
of a real Dagster run; each adapter's rows must equal the same rows run with that adapter alone,
and differ from the base model's. The reference engine reads the base model and the adapters from
a local S3 server (``dynamic_lora_loading_path="s3://..."``)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from llm_assets import vLLMEngineProcessorConfig
from llm_assets.engines.vllm import vLLMEngine
from llm_assets.execution.cache import CacheSettings, request_keys
from llm_assets.pipeline import LLMPipeline
from llm_assets.rows import ERROR_COLUMN, RowError
from llm_assets.sources import LocalFolderSource
from tests.helpers.data import write_jsonl
from tests.helpers.pipelines import make_resources, run_job
from tests.helpers.stages import preprocess_stage

pytestmark = pytest.mark.slow

LORA_KWARGS = {"max_model_len": 256, "enable_lora": True, "max_lora_rank": 8, "max_loras": 2}
PARAMS = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
QUESTIONS = ["What is the capital of France?", "Name a color.", "Count to three."]
ADAPTERS = ("style-a", "style-b")


def build_adapter(folder: Path, model: str, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for the tiny
    Llama's attention projections, with random A and B: peft's own init zeroes B (no effect)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for projection in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator) * 0.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": ["q_proj", "v_proj"],
                "base_model_name_or_path": model,
                "fan_in_fan_out": False,
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def adapters_folder(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(ADAPTERS, start=1):
        build_adapter(root / name, tiny_model, seed)
    build_adapter(root / "too-wide", tiny_model, 3, rank=16)  # above max_lora_rank: vLLM refuses it
    return root


def to_chat(row):
    return {
        "question": row["question"],
        "model": row["model"],
        "messages": [{"role": "user", "content": row["question"]}],
        "sampling_params": PARAMS,
    }


def lora_pipeline(landing: Path, model: str, **config) -> LLMPipeline:
    settings = {"model_source": model, "engine_kwargs": LORA_KWARGS, "batch_size": 16, **config}
    return LLMPipeline("tiny", settings, LocalFolderSource(str(landing)), preprocess=to_chat)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_model, adapters_folder, ray_session):
    """One partition, one batch: every question for adapter A, adapter B and the base model."""
    import dagster as dg

    root = tmp_path_factory.mktemp("lora-run")
    rows = [{"question": q, "model": model} for model in (*ADAPTERS, tiny_model) for q in QUESTIONS]
    write_jsonl(root / "landing" / "mixed.jsonl", rows)
    pipeline = lora_pipeline(root / "landing", tiny_model, dynamic_lora_loading_path=str(adapters_folder))
    resources = make_resources(root / "storage")
    with dg.instance_for_test() as instance:
        assert run_job(pipeline, resources, instance, {"dagster/partition": "mixed.jsonl"}).success
    storage = resources["storage"].store()
    tokenized = [r for t in storage.read_committed("tiny", "tokenize", "mixed.jsonl") for r in t.to_pylist()]
    engine = {r["row_id"]: r for t in storage.read_committed("tiny", "engine", "mixed.jsonl") for r in t.to_pylist()}
    return tokenized, engine


@pytest.fixture(scope="module")
def s3_engine(tiny_model, adapters_folder, s3_endpoint, tmp_path_factory):
    """The vLLM replica in this process, its base model and adapters on the local S3 server."""
    from dagster_aws.s3 import S3Resource

    from llm_assets.engines.vllm import compat
    from llm_assets.engines.vllm.replica import vLLMEngineStage
    from llm_assets.model_store import S3Access, model_on_this_node
    from llm_assets.models import resolve_model_source
    from llm_assets.upload_model import upload

    resource = S3Resource(
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test-key-id",
        aws_secret_access_key="test-secret-key-not-for-logs",
    )
    resource.get_client().create_bucket(Bucket="lora-test")
    for name in (*ADAPTERS, "too-wide"):
        upload(adapters_folder / name, f"s3://lora-test/adapters/{name}", S3Access.of(resource), log=lambda line: None)
    upload(Path(tiny_model), "s3://lora-test/models/tiny", S3Access.of(resource), log=lambda line: None)
    cache = tmp_path_factory.mktemp("model-cache")
    saved = {key: os.environ.get(key) for key in ("LLM_ASSETS_MODEL_CACHE", *compat.platform_env(False))}
    os.environ.update({"LLM_ASSETS_MODEL_CACHE": str(cache), **compat.platform_env(False)})
    config = vLLMEngineProcessorConfig(
        model_source="s3://lora-test/models/tiny",
        engine_kwargs=LORA_KWARGS,
        dynamic_lora_loading_path="s3://lora-test/adapters",
        should_continue_on_error=True,
    )
    target = resolve_model_source(config.model_source, lambda line: None, resource)
    kwargs = vLLMEngine(config).replica_kwargs(target, False, True)  # the S3 settings travel with the S3 model
    kwargs["model_source"] = model_on_this_node(kwargs["model_source"])
    stage = vLLMEngineStage(**kwargs)
    yield stage, cache
    stage.shutdown()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def alone(stage, rows: list[dict], model) -> dict:
    """The rows run with one adapter (or the base model) alone: nothing else in the engine."""
    batch = pa.table(
        {
            "row_id": [r["row_id"] for r in rows],
            "tokenized_prompt": [r["tokenized_prompt"] for r in rows],
            "sampling_params": [r["sampling_params"] for r in rows],
            "model": [model] * len(rows),
        }
    )
    output = asyncio.run(stage.process(batch)).to_pylist()
    assert all(r[ERROR_COLUMN] == "" for r in output), [r[ERROR_COLUMN] for r in output]
    return {r["row_id"]: r["generated_tokens"] for r in output}


def test_two_adapters_in_one_partition_each_answer_as_alone(mixed_run, s3_engine, tiny_model):
    tokenized, engine = mixed_run
    stage, cache = s3_engine
    assert len(engine) == 9 and all(r.get(ERROR_COLUMN) == "" for r in engine.values())
    by_model = {model: [r for r in tokenized if r["model"] == model] for model in (*ADAPTERS, tiny_model)}
    reference = {model: alone(stage, rows, model if model in ADAPTERS else None) for model, rows in by_model.items()}
    for model, rows in by_model.items():
        assert len(rows) == 3
        assert {r["row_id"]: engine[r["row_id"]]["generated_tokens"] for r in rows} == reference[model], model
    # The adapters change the answer (else this test could not fail): per question, three outputs.
    for i in range(3):
        outputs = [reference[model][by_model[model][i]["row_id"]] for model in (*ADAPTERS, tiny_model)]
        assert len({tuple(o) for o in outputs}) == 3, outputs
    # Each adapter came from S3, downloaded once into the model cache.
    downloaded = sorted(p.parent.name for p in cache.glob("s3-lora-test-*/adapter_config.json"))
    assert all(sum(f"-{name}-" in d for d in downloaded) == 1 for name in ADAPTERS), downloaded


def test_an_adapter_that_does_not_resolve_or_load_fails_its_rows_only(s3_engine):
    stage, _ = s3_engine
    batch = pa.table(
        {
            "row_id": ["lost", "wide", "base", "a"],
            "tokenized_prompt": [[5, 6, 7]] * 4,
            "sampling_params": [json.dumps(PARAMS)] * 4,
            "model": ["no-such-adapter", "too-wide", None, "style-a"],
        }
    )
    lost, wide, base, a = asyncio.run(stage.process(batch)).to_pylist()
    assert (
        "LoRA adapter 'no-such-adapter' was not found under dynamic_lora_loading_path 's3://lora-test/adapters'"
        in lost[ERROR_COLUMN]
    )
    assert "LoRA adapter 'too-wide'" in wide[ERROR_COLUMN] and "vLLM did not load it" in wide[ERROR_COLUMN], wide[
        ERROR_COLUMN
    ]
    assert "16" in wide[ERROR_COLUMN]  # vLLM's words: the rank it was given
    for row in (base, a):  # the engine lives on and serves the others
        assert row[ERROR_COLUMN] == "" and len(row["generated_tokens"]) == 6


def check_model(config: vLLMEngineProcessorConfig, model) -> None:
    stage = preprocess_stage(lambda row: {"prompt": "hi", "model": row["model"]}, config=config)
    stage(pa.table({"row_id": ["r1"], "model": [model]}))


def test_an_adapter_row_without_enable_lora_fails_preprocess_naming_the_row_and_setting(tiny_model, adapters_folder):
    plain = vLLMEngineProcessorConfig(model_source=tiny_model, engine_kwargs={"max_model_len": 256})
    check_model(plain, tiny_model)  # the base model by its name: no adapter
    check_model(plain, None)
    with pytest.raises(RowError) as caught:
        check_model(plain, "style-a")
    assert "row 'r1'" in str(caught.value) and "LoRA adapter 'style-a'" in str(caught.value)
    assert "engine_kwargs.enable_lora is not set" in str(caught.value)
    local = vLLMEngineProcessorConfig(
        model_source=tiny_model, engine_kwargs=LORA_KWARGS, dynamic_lora_loading_path=str(adapters_folder)
    )
    check_model(local, "style-b")
    with pytest.raises(
        RowError, match=f"LoRA adapter 'style-c', and {adapters_folder}/style-c has no adapter_config.json"
    ):
        check_model(local, "style-c")
    with pytest.raises(RowError, match="cannot be a remote path"):
        check_model(local, "s3://bucket/style-a")


def test_lora_settings_are_checked_when_defined(tiny_model):
    with pytest.raises(ValidationError, match="dynamic_lora_loading_path is set and engine_kwargs.enable_lora is not"):
        vLLMEngineProcessorConfig(model_source=tiny_model, dynamic_lora_loading_path="/adapters")
    with pytest.raises(ValidationError, match="expected a local folder or an s3://bucket/prefix"):
        vLLMEngineProcessorConfig(
            model_source=tiny_model, engine_kwargs=LORA_KWARGS, dynamic_lora_loading_path="gs://b/adapters"
        )
    a = vLLMEngineProcessorConfig(
        model_source=tiny_model, engine_kwargs=LORA_KWARGS, dynamic_lora_loading_path="/adapters/v1"
    )
    b = a.model_copy(update={"dynamic_lora_loading_path": "/adapters/v2"})
    assert (
        vLLMEngine(a).output_settings() != vLLMEngine(b).output_settings()
    )  # the engine stage's code version and cache scope


def test_the_response_cache_keys_a_lora_row_apart_from_the_base_model():
    settings = CacheSettings("scope", "folder", "deterministic", False, ("generated_tokens",), ())
    table = pa.table(
        {
            "row_id": ["a", "b", "base", "none"],
            "tokenized_prompt": [[5, 6]] * 4,
            "sampling_params": [json.dumps(PARAMS)] * 4,
            "model": ["style-a", "style-b", "/m/tiny", None],
        }
    )
    keys = request_keys(table, settings).to_pylist()
    assert None not in keys and len(set(keys)) == 4
