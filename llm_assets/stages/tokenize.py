"""Tokenize: ``prompt`` -> ``tokenized_prompt`` token ids for the engine, with each row's
``tokenization_kwargs`` (``add_special_tokens``, ``truncation``, ``max_length``) when it has them.
With ``pair`` (a task that scores pairs, e.g. ``("query", "document")``): the row's pair ->
``tokenized_prompt`` and, where the tokenizer gives them, ``token_type_ids`` (which segment each
token is in)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Optional

import pyarrow as pa

from llm_assets.rows import ERROR_COLUMN, ROW_ID, RowError, column_or_none, ok_rows, with_column
from llm_assets.stages.tokenizer import load_tokenizer

STAGE = "tokenize"


class TokenizeStage:
    """Token ids of each prompt. A prompt longer than the engine's context (``max_prompt_tokens``,
    when the engine's settings say it) is found here, before any engine: the row fails naming it,
    or with ``should_continue_on_error`` is kept with ``__inference_error__`` set."""

    NEEDS = ("prompt|<pair>",)
    ADDS = ("tokenized_prompt", "token_type_ids")
    PROCESSOR_KWARGS = ("max_prompt_tokens", "should_continue_on_error", "pair")

    def __init__(
        self,
        model_source: str,
        max_prompt_tokens: Optional[int] = None,
        should_continue_on_error: bool = False,
        pair: Optional[tuple[str, str]] = None,
    ):
        self.tokenizer = load_tokenizer(model_source)
        self.max_prompt_tokens = max_prompt_tokens
        self.should_continue_on_error = should_continue_on_error
        self.pair = pair

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.pair is not None:
            return self._pairs(batch)
        prompts = batch.column("prompt").to_pylist()
        templated = [m is not None for m in column_or_none(batch, "messages")]
        row_kwargs = column_or_none(batch, "tokenization_kwargs")
        ok = ok_rows(batch)
        ids: list = [None] * batch.num_rows
        # Rows tokenized alike, tokenized together. A chat template already wrote the special
        # tokens (BOS...) into the text; a raw prompt gets them from the tokenizer, as vLLM itself
        # would do; a row's tokenization_kwargs win.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(batch.num_rows):
            if ok[i]:
                groups[(not templated[i], row_kwargs[i])].append(i)
        for (add_special, kwargs_json), index in groups.items():
            kwargs = {"add_special_tokens": add_special, **(json.loads(kwargs_json) if kwargs_json else {})}
            encoded = self.tokenizer([prompts[i] for i in index], **kwargs)["input_ids"]
            for i, token_ids in zip(index, encoded):
                ids[i] = token_ids
        batch = with_column(batch, "tokenized_prompt", ids, pa.list_(pa.int32()))
        return self._too_long(batch, ids) if self.max_prompt_tokens else batch

    def _pairs(self, batch: pa.Table) -> pa.Table:
        ok = ok_rows(batch)
        index = [i for i in range(batch.num_rows) if ok[i]]
        first, second = (batch.column(name).to_pylist() for name in self.pair)
        encoded = self.tokenizer([first[i] for i in index], [second[i] for i in index]) if index else {"input_ids": []}
        ids: list = [None] * batch.num_rows
        types: list = [None] * batch.num_rows
        for position, i in enumerate(index):
            ids[i] = encoded["input_ids"][position]
            if "token_type_ids" in encoded:
                types[i] = encoded["token_type_ids"][position]
        batch = with_column(batch, "tokenized_prompt", ids, pa.list_(pa.int32()))
        if any(t is not None for t in types):  # a tokenizer without segments (an LLM reranker's) gives none
            batch = with_column(batch, "token_type_ids", types, pa.list_(pa.int8()))
        return self._too_long(batch, ids) if self.max_prompt_tokens else batch

    def _too_long(self, batch: pa.Table, ids: list) -> pa.Table:
        errors = column_or_none(batch, ERROR_COLUMN)
        found = False
        for i, token_ids in enumerate(ids):
            if token_ids is not None and len(token_ids) > self.max_prompt_tokens:
                problem = (
                    f"the prompt has {len(token_ids)} tokens: this model's maximum context length is "
                    f"{self.max_prompt_tokens} tokens (context_length_exceeded)"
                )
                if not self.should_continue_on_error:
                    raise RowError(batch.column(ROW_ID)[i].as_py(), STAGE, problem)
                errors[i], found = f"ValueError: {problem}", True
        return (
            with_column(batch, ERROR_COLUMN, errors, pa.string())
            if found or ERROR_COLUMN in batch.column_names
            else batch
        )
