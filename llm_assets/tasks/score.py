"""Scoring: a (query, document) pair in, a cross-encoder's relevance score out.

Each row gives ``query`` and ``document``; Tokenize encodes them as one pair (the tokenizer's
separator and ``token_type_ids``, as the model was trained), and the engine runs the model's
classification head on it, as vLLM's ``LLM.score`` does for a cross-encoder. ``score`` is the
head's one output after its activation (a sigmoid for a one-label model, the sentence-transformers
default); ``embeddings`` holds every output (a model with several labels gives no ``score``)."""

from llm_assets.tasks.base import ENGINE, TaskType

# The row's fields that make the pair, in order.
PAIR = ("query", "document")

SCORE = TaskType(
    name="score",
    stages=("preprocess", "tokenize", ENGINE, "postprocess"),
    engine_columns=("score", "embeddings", "num_input_tokens", "time_taken_llm"),
    text_column=None,
)
