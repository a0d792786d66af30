"""PrepareMultimodal: OpenAI-style media content parts -> the model's placeholders in ``messages``
and the media in ``multimodal_data`` (see media.py for how they are stored).

Each part's bytes are read (http(s), data URL, local path; ``image_pil`` arrived as a PNG data URL
from Preprocess) and decoded with vLLM's own loaders, so a 404, an unreadable file or corrupt bytes
fail the row here, naming the part, before any engine starts. Then vLLM's chat-message parser (what
vLLM's server runs) writes the model's placeholder (``<image>``, ``<|image_pad|>``...) into the
conversation that the ChatTemplate stage renders, and refuses media the model does not take (audio
for an image model, more items than ``limit_mm_per_prompt``). With ``should_continue_on_error`` such a
row is kept with ``__inference_error__`` set (``MediaError: ...``) and passes by the later stages
untouched, so one dead URL does not fail its partition; the ``media_readable`` check counts them.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pyarrow as pa

from llm_assets.rows import ERROR_COLUMN, ROW_ID, RowError, column_or_none, ok_rows, with_column
from llm_assets.stages import media

STAGE = "prepare_multimodal"
ERROR_TYPE = "MediaError"  # what a row failed here has in __inference_error__: "MediaError: <field>: <problem>"


class PrepareMultimodalStage:
    NEEDS = ("messages|prompt",)  # rows with a ready prompt pass through
    ADDS = ("messages", media.COLUMN)
    CONFIG_KWARGS = ("model_config_kwargs", "chat_template_content_format", "apply_sys_msg_formatting")
    PROCESSOR_KWARGS = ("should_continue_on_error",)

    def __init__(
        self,
        model_source: str,
        model_config_kwargs: Optional[dict[str, Any]] = None,
        chat_template_content_format: str = "string",
        apply_sys_msg_formatting: bool = False,
        should_continue_on_error: bool = False,
    ):
        from vllm.config import ModelConfig

        kwargs = {"model": model_source, **(model_config_kwargs or {})}
        # The config only parses messages here: vLLM's dtype "auto" would probe the device, which
        # fails on a CPU-only node (ray.data.llm does the same).
        if kwargs.get("dtype") in (None, "auto"):
            kwargs["dtype"] = "float32"
        self.model_config = ModelConfig(**kwargs)
        self.media_io_kwargs = getattr(
            self.model_config.multimodal_config, "media_io_kwargs", None
        )  # None for a text-only model
        self.content_format = chat_template_content_format
        self.apply_sys_msg_formatting = apply_sys_msg_formatting
        self.should_continue_on_error = should_continue_on_error

    def __call__(self, batch: pa.Table) -> pa.Table:
        row_ids = batch.column(ROW_ID).to_pylist()
        messages = column_or_none(batch, "messages")
        errors = column_or_none(batch, ERROR_COLUMN)
        items: list = [None] * batch.num_rows
        for i, ok in enumerate(ok_rows(batch)):
            if ok and messages[i] is not None:
                try:
                    messages[i], items[i] = self._one(row_ids[i], json.loads(messages[i]))
                except RowError as exc:
                    if not self.should_continue_on_error:
                        raise
                    errors[i] = f"{ERROR_TYPE}: {exc.problem}"
        batch = with_column(batch, "messages", messages, pa.string())
        if any(error is not None for error in errors):
            batch = with_column(batch, ERROR_COLUMN, errors, pa.string())
        return with_column(batch, media.COLUMN, items, media.COLUMN_TYPE)

    def _one(self, row_id: Any, messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        system = []
        if self.apply_sys_msg_formatting:
            # System messages stay plain strings: some chat templates (Pixtral's) expect that.
            system = [{**m, "content": _text_of(m["content"])} for m in messages if m["role"] == "system"]
            messages = [m for m in messages if m["role"] != "system"]
        items, parsed_messages = [], []
        for i, message in enumerate(messages):
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if part.get("type") in media.PART_TYPES:
                        field = f"messages[{i}].content[{j}].{part['type']}"
                        parts.append(self._read(row_id, field, part, items))
                    else:
                        parts.append(part)
                message = {**message, "content": parts}
            parsed_messages.append(message)
        try:
            conversation, _decoded = media.parse_chat_messages(parsed_messages, self.model_config, self.content_format)
        except Exception as exc:  # every part decoded: what is left is the model's refusal (limits, modality)
            raise RowError(
                row_id, STAGE, f"vLLM refuses the messages for this model: {type(exc).__name__}: {exc}"
            ) from exc
        return json.dumps(system + [_plain(m) for m in conversation]), items

    def _read(self, row_id: Any, field: str, part: dict[str, Any], items: list) -> dict[str, Any]:
        """Read and decode the part, its stored item into ``items``; returns the part vLLM's parser
        gets: the decoded image (not decoded twice), or a data URL of the bytes read (vLLM fetches
        nothing itself)."""
        try:
            modality, url = media.part_reference(part)
            item, data = media.read_item(modality, url)
            decoded = media.decode(modality, item["mime_type"], data, self.media_io_kwargs)
        except media.MediaError as exc:
            raise RowError(row_id, STAGE, f"{field}: {exc}") from None
        items.append(item)
        if modality == "image":
            return {"type": "image_pil", "image_pil": decoded}
        kind = f"{modality}_url"
        return {"type": kind, kind: {"url": media.data_url(item["mime_type"], data)}}


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(part.get("text") or "" for part in content if part.get("type") == "text")
    return content


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """vLLM's conversation message, without the keys it leaves empty (Arrow/JSON friendly)."""
    return {key: value for key, value in dict(message).items() if value is not None}
