"""task_type="score" through a real Dagster run: (query, document) pairs scored by a small
cross-encoder built offline (random weights, all-MiniLM-L6-v2's WordPiece tokenizer), checked
against transformers' own forward pass on the same weights and the same pairs."""

from pathlib import Path

import numpy as np
import pytest

from llm_assets import vLLMEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from tests.helpers.data import write_jsonl
from tests.helpers.models import tiny_bert_classifier
from tests.helpers.pipelines import log_messages, make_resources, run_job

pytestmark = pytest.mark.slow

PAIRS = [
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("What is the capital of France?", "The Amazon is the largest rainforest on Earth."),
    ("How do bees make honey?", "Bees turn nectar into honey by evaporation and enzymes."),
    ("How do bees make honey?", "Paris is the capital and largest city of France."),
]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory, minilm) -> str:
    return tiny_bert_classifier(tmp_path_factory.mktemp("tiny-cross-encoder"), minilm, num_labels=1)


def reference(model_dir: str) -> np.ndarray:
    """What a cross-encoder's user computes: the pair through the model, the one logit's sigmoid."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer, model = (
        AutoTokenizer.from_pretrained(model_dir),
        AutoModelForSequenceClassification.from_pretrained(model_dir),
    )
    queries, documents = zip(*PAIRS)
    with torch.no_grad():
        logits = model(**tokenizer(list(queries), list(documents), padding=True, return_tensors="pt")).logits
    return torch.sigmoid(logits[:, 0]).numpy()


def score_pipeline(landing: Path, model: str) -> LLMPipeline:
    config = vLLMEngineProcessorConfig(model_source=model, task_type="score", engine_kwargs={"max_model_len": 128})
    return LLMPipeline(
        "rank",
        config,
        LocalFolderSource(str(landing)),
        preprocess=lambda row: {"query": row["q"], "document": row["d"]},
    )


def test_pair_scores_match_transformers(tmp_path, ray_session, instance, cross_encoder):
    write_jsonl(tmp_path / "landing" / "pairs.jsonl", [{"q": q, "d": d} for q, d in PAIRS])
    pipeline = score_pipeline(tmp_path / "landing", cross_encoder)
    assert pipeline.stage_names() == ["preprocess", "tokenize", "engine", "postprocess"]
    result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "pairs.jsonl"})
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"].store()
    rows = [r for t in storage.read_committed("rank", "postprocess", "pairs.jsonl") for r in t.to_pylist()]
    assert [(r["query"], r["document"]) for r in rows] == PAIRS
    ours = np.array([r["score"] for r in rows])
    np.testing.assert_allclose(ours, reference(cross_encoder), atol=1e-4)
    assert all(r["embeddings"] == pytest.approx([r["score"]]) for r in rows)
    # The pair was encoded as the model was trained: [CLS] query [SEP] document [SEP], segments 0 then 1.
    tokenized = [r for t in storage.read_committed("rank", "tokenize", "pairs.jsonl") for r in t.to_pylist()]
    first = tokenized[0]
    assert first["token_type_ids"][0] == 0 and first["token_type_ids"][-1] == 1
    assert len(first["token_type_ids"]) == len(first["tokenized_prompt"]) == rows[0]["num_input_tokens"]


def test_a_row_without_its_document_fails_before_any_engine(tmp_path, ray_session, instance, cross_encoder):
    write_jsonl(
        tmp_path / "landing" / "pairs.jsonl",
        [{"q": "a question", "d": "a document"}, {"q": "another question", "d": ""}],
    )
    pipeline = score_pipeline(tmp_path / "landing", cross_encoder)
    result = run_job(
        pipeline,
        make_resources(tmp_path / "storage"),
        instance,
        {"dagster/partition": "pairs.jsonl"},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    headline = (failure.step_failure_data.error.cause or failure.step_failure_data.error).message.splitlines()[0]
    assert "row 'pairs.jsonl:1': 'document' is ''" in headline and "'query' and 'document'" in headline, headline
    assert not any("engine 0 started in" in m for m in log_messages(instance, result.run_id))
