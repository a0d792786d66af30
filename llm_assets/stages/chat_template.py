"""ChatTemplate: ``messages`` -> ``prompt`` text with the tokenizer's chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

from llm_assets.rows import ROW_ID, RowError, column_or_none, ok_rows, with_column
from llm_assets.stages.tokenizer import load_tokenizer

STAGE = "chat_template"


class ChatTemplateStage:
    NEEDS = ("messages|prompt",)  # rows with a ready prompt pass through
    ADDS = ("prompt",)
    CONFIG_KWARGS = ("chat_template", "chat_template_kwargs")

    def __init__(
        self,
        model_source: str,
        chat_template: Optional[str] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
    ):
        self.tokenizer = load_tokenizer(model_source)
        self.chat_template = chat_template
        self.chat_template_kwargs = chat_template_kwargs or {}
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise _no_template(model_source)

    @staticmethod
    def check_before_run(model_source: str, chat_template: Optional[str] = None, **_: Any) -> None:
        """Run by the driver before any worker or engine starts: a model without a chat template
        fails the run at once. Reading the model's files is enough to know it has one; only when
        they show none is the tokenizer loaded to be sure (transformers has other places)."""
        if chat_template is not None or _template_file(Path(model_source)):
            return
        if not getattr(load_tokenizer(model_source), "chat_template", None):
            raise _no_template(model_source)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = column_or_none(batch, "prompt")
        if "messages" not in batch.column_names:
            return batch  # rows carry a ready prompt
        row_ids = batch.column(ROW_ID).to_pylist()
        for i, (messages, ok) in enumerate(zip(batch.column("messages").to_pylist(), ok_rows(batch))):
            if ok and messages is not None:
                prompts[i] = self._render(row_ids[i], messages)
        return with_column(batch, "prompt", prompts, pa.string())

    def _render(self, row_id: Any, messages: Any) -> str:
        if isinstance(messages, str):  # JSON text, as PrepareMultimodal writes it (content may be a list of parts)
            messages = json.loads(messages)
        # Arrow gives every message every key seen in the batch; drop the ones this message lacks.
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        last_role = messages[-1]["role"]
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                chat_template=self.chat_template,
                # A generation prompt only when the model is to answer the user; a trailing
                # assistant message is continued instead (prefill).
                add_generation_prompt=last_role == "user",
                continue_final_message=last_role == "assistant",
                **self.chat_template_kwargs,
            )
        except Exception as exc:
            raise RowError(row_id, STAGE, f"the chat template failed: {type(exc).__name__}: {exc}") from exc


def _template_file(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def _no_template(model_source: str) -> ValueError:
    return ValueError(
        f"{STAGE}: the tokenizer of {model_source!r} has no chat template; pass "
        "chat_template_stage={'chat_template': '...'} or give rows a plain 'prompt' and "
        "disable the stage (chat_template_stage=False)"
    )
