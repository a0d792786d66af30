"""Embeddings: a prompt (or chat) in, the model's pooled vector out (``embeddings``, float32)."""

from llm_assets.openai_batch.urls import EMBEDDINGS
from llm_assets.tasks.base import ENGINE, TaskType

EMBED = TaskType(
    name="embed",
    stages=("preprocess", "chat_template", "tokenize", ENGINE, "postprocess"),
    engine_columns=("embeddings", "num_input_tokens", "time_taken_llm"),
    text_column=None,
    # Text is embedded as it is, unless the processor sets chat_template_stage itself.
    off_by_default=("chat_template",),
    openai_urls=(EMBEDDINGS,),
)
