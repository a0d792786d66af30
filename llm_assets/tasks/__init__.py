"""Task types by ``task_type`` name. A new task type is a module here and one line below."""

from llm_assets.tasks.base import ENGINE, TaskType
from llm_assets.tasks.classify import CLASSIFY
from llm_assets.tasks.embed import EMBED
from llm_assets.tasks.generate import GENERATE
from llm_assets.tasks.score import SCORE

TASKS: dict[str, TaskType] = {task.name: task for task in (GENERATE, EMBED, CLASSIFY, SCORE)}

__all__ = ["ENGINE", "TASKS", "TaskType"]
