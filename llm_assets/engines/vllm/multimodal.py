"""A row's stored media (``multimodal_data``, see stages/media.py) -> vLLM's ``multi_modal_data``.

The bytes are handed to vLLM's own chat-message parser as data URLs, so the engine decodes them
exactly as vLLM's server would (the image mode, the audio and video backends, the per-prompt
limits of the engine's ``limit_mm_per_prompt``). Media stored as a reference are read again and
checked against the digest the PrepareMultimodal stage recorded.
"""

from __future__ import annotations

from typing import Any

from llm_assets.stages import media


def multi_modal_data(items: list[dict[str, Any]], model_config: Any) -> dict[str, Any]:
    parts = []
    for item in items:
        kind = f"{item['modality']}_url"
        parts.append({"type": kind, kind: {"url": media.data_url(item["mime_type"], media.item_bytes(item))}})
    # "openai": only the media are wanted here; the placeholders are already in the prompt's tokens.
    _conversation, decoded = media.parse_chat_messages([{"role": "user", "content": parts}], model_config, "openai")
    return decoded or {}
