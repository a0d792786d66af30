"""Model folders tests derive from the real ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def model_without_chat_template(model: str, folder: Path) -> str:
    """A copy of ``model`` whose tokenizer has no chat template."""
    shutil.copytree(model, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def tiny_bert_classifier(folder: Path, minilm: str, num_labels: int) -> str:
    """A small sequence-classification BERT with random weights (seeded) and all-MiniLM-L6-v2's
    WordPiece tokenizer: a classifier, or with one label a cross-encoder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(minilm) / name, folder / name)
    return str(folder)
