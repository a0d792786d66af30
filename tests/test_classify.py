"""task_type="classify" through a real Dagster run on a small sequence-classification model built
offline (random weights, all-MiniLM-L6-v2's WordPiece tokenizer), checked against transformers'
own forward pass and softmax on the same weights."""

import numpy as np
import pytest

from llm_assets import vLLMEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from tests.helpers.data import write_jsonl
from tests.helpers.models import tiny_bert_classifier
from tests.helpers.pipelines import make_resources, run_job

pytestmark = pytest.mark.slow

TEXTS = [
    "The film was wonderful.",
    "A dull and tiring evening.",
    "It rained in the afternoon.",
    "Best meal of my life!",
]
LABELS = 3


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, minilm) -> str:
    return tiny_bert_classifier(tmp_path_factory.mktemp("tiny-classifier"), minilm, num_labels=LABELS)


def reference(model_dir: str) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer, model = (
        AutoTokenizer.from_pretrained(model_dir),
        AutoModelForSequenceClassification.from_pretrained(model_dir),
    )
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    return torch.softmax(logits, dim=-1).numpy()


def test_class_probabilities_match_transformers(tmp_path, ray_session, instance, classifier):
    write_jsonl(tmp_path / "landing" / "t.jsonl", [{"text": t} for t in TEXTS])
    config = vLLMEngineProcessorConfig(
        model_source=classifier, task_type="classify", engine_kwargs={"max_model_len": 128}
    )
    pipeline = LLMPipeline(
        "cls",
        config,
        LocalFolderSource(str(tmp_path / "landing")),
        preprocess=lambda row: {"text": row["text"], "prompt": row["text"]},
    )
    result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "t.jsonl"})
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"].store()
    rows = {r["text"]: r for t in storage.read_committed("cls", "postprocess", "t.jsonl") for r in t.to_pylist()}
    ours = np.array([rows[t]["embeddings"] for t in TEXTS])
    assert ours.shape == (len(TEXTS), LABELS)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(ours, reference(classifier), atol=1e-4)
