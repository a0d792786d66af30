"""Text generation: chat messages or a prompt in, generated tokens and text out."""

from llm_assets.openai_batch.urls import CHAT, COMPLETIONS, RESPONSES
from llm_assets.tasks.base import ENGINE, TaskType

GENERATE = TaskType(
    name="generate",
    stages=("preprocess", "prepare_multimodal", "chat_template", "tokenize", ENGINE, "detokenize", "postprocess"),
    engine_columns=(
        "generated_tokens",
        "num_input_tokens",
        "num_generated_tokens",
        "time_taken_llm",
        "finish_reason",
        "request_id",
        "logprobs",
        "prompt_logprobs",
    ),
    openai_urls=(CHAT, COMPLETIONS, RESPONSES),
)
