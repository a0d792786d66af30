"""Scoring: a (query, document) pair in, a cross-encoder's relevance score out.

Each row gives ``query`` and ``document``; Tokenize encodes them as one pair (the tokenizer's
separator and ``token_type_ids``, as the model was trained), and the engine runs the model's
classification head on it, as vLLM's ``LLM.score`` does for a cross-encoder. ``score`` is the
head's one output after its activation (a sigmoid for a one-label model, the sentence-transformers
default); ``embeddings`` holds every output (a model with several labels gives no ``score``)."""

from dataclasses import dataclass
from typing import Any

from llm_assets.tasks.base import ENGINE, TaskType
from llm_assets.tasks.requests import RowContext, check_pooling_params

# The row's fields that make the pair, in order.
PAIR = ("query", "document")


@dataclass(frozen=True)
class PairTask(TaskType):
    def check_row(self, row: dict[str, Any], context: RowContext) -> dict[str, Any]:
        """A pair for a cross-encoder, not a prompt."""
        self.check_openai_url(row)
        for name in PAIR:
            if not isinstance(row.get(name), str) or not row[name]:
                raise ValueError(
                    f"'{name}' is {row.get(name)!r}: task_type='score' scores a pair of non-empty strings, "
                    f"{' and '.join(map(repr, PAIR))} (return them from preprocess)"
                )
        return check_pooling_params(row)


SCORE = PairTask(
    name="score",
    stages=("preprocess", "tokenize", ENGINE, "postprocess"),
    engine_columns=("score", "embeddings", "num_input_tokens", "time_taken_llm"),
    text_column=None,
    tokenize_pair=PAIR,
)
