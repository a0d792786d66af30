"""Classification: a prompt in, a sequence-classification model's class probabilities out
(in ``embeddings``, as ray.data.llm writes them)."""

from llm_assets.tasks.base import ENGINE, TaskType

CLASSIFY = TaskType(
    name="classify",
    stages=("preprocess", "chat_template", "tokenize", ENGINE, "postprocess"),
    engine_columns=("embeddings", "num_input_tokens", "time_taken_llm"),
    text_column=None,
    off_by_default=("chat_template",),
)
