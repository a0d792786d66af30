"""Detokenize: ``generated_tokens`` -> ``generated_text``."""

from __future__ import annotations

import pyarrow as pa

from llm_assets.rows import ok_rows, with_column
from llm_assets.stages.tokenizer import load_tokenizer


class DetokenizeStage:
    NEEDS = ("generated_tokens",)
    ADDS = ("generated_text",)

    def __init__(self, model_source: str):
        self.tokenizer = load_tokenizer(model_source)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tokens = batch.column("generated_tokens").to_pylist()
        texts = [
            self.tokenizer.decode(ids, skip_special_tokens=True) if ok and ids is not None else None
            for ids, ok in zip(tokens, ok_rows(batch))
        ]
        return with_column(batch, "generated_text", texts, pa.string())
