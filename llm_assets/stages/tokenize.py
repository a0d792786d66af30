"""Tokenize: ``prompt`` -> ``tokenized_prompt`` token ids for the engine."""

from __future__ import annotations

import pyarrow as pa

from llm_assets.stages.base import column_or_none, ok_rows, with_column
from llm_assets.stages.tokenizer import load_tokenizer


class TokenizeStage:
    NEEDS = ("prompt",)
    ADDS = ("tokenized_prompt",)

    def __init__(self, model_source: str):
        self.tokenizer = load_tokenizer(model_source)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt").to_pylist()
        templated = [m is not None for m in column_or_none(batch, "messages")]
        ok = ok_rows(batch)
        ids: list = [None] * batch.num_rows
        # A chat template already wrote the special tokens (BOS...) into the text; a raw prompt
        # gets them from the tokenizer, as vLLM itself would do.
        for add_special in (False, True):
            index = [i for i in range(batch.num_rows) if ok[i] and templated[i] != add_special]
            if index:
                encoded = self.tokenizer([prompts[i] for i in index], add_special_tokens=add_special)["input_ids"]
                for i, token_ids in zip(index, encoded):
                    ids[i] = token_ids
        return with_column(batch, "tokenized_prompt", ids, pa.list_(pa.int32()))
