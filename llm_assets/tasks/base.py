"""What a task type is: the stages it runs, in order, and the columns its engine adds.

A task type (generate, embed, classify, score) decides the pipeline's stage plan: which stages run
around the engine and which columns come out of it. Adding one is a module under ``tasks/`` with a
``TaskType`` and one line in ``tasks/__init__.py``'s ``TASKS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from llm_assets.tasks.requests import RowContext, check_request

# The engine stage's name in every plan (its asset is ``{pipeline}/engine``).
ENGINE = "engine"


@dataclass(frozen=True)
class TaskType:
    name: str
    # Stage names in order, the engine included; optional CPU stages run when their processor
    # field (``chat_template_stage``...) is enabled.
    stages: tuple[str, ...]
    # Columns the engine adds to each row (what later stages and checks may read).
    engine_columns: tuple[str, ...]
    # The column holding the text a user checks (the generations_not_empty check reads it);
    # None for a task that generates no text.
    text_column: Optional[str] = "generated_text"
    # Optional stages that run only where the processor config sets their field explicitly.
    off_by_default: tuple[str, ...] = ()
    # The OpenAI Batch endpoints (a row's ``openai_url``) whose requests this task answers.
    openai_urls: tuple[str, ...] = ()
    # The two fields Tokenize encodes as one pair (a cross-encoder's query and document), if any.
    tokenize_pair: Optional[tuple[str, str]] = None

    def check_row(self, row: dict[str, Any], context: RowContext) -> dict[str, Any]:
        """Preprocess's check of one row for this task (raises ValueError naming the field)."""
        self.check_openai_url(row)
        return check_request(row, context)

    def check_openai_url(self, row: dict[str, Any]) -> None:
        url = row.get("openai_url")  # a row of an OpenAI Batch file: its endpoint must be this task's
        if url is not None and url not in self.openai_urls:
            raise ValueError(f"is a {url} request, and this pipeline's task_type is {self.name!r}")
