"""What a task type is: the stages it runs, in order, and the columns its engine adds.

A task type (generate, embed, classify, score) decides the pipeline's stage plan: which stages run
around the engine and which columns come out of it. Adding one is a module under ``tasks/`` with a
``TaskType`` and one line in ``tasks/__init__.py``'s ``TASKS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
