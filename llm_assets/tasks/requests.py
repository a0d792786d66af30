"""The row checks of the model tasks (generate, embed, classify): a row is a request with ``messages``
or a ``prompt``, and optional ``sampling_params``, ``tokenization_kwargs``, ``pooling_params`` and
``model``. Each check raises ValueError naming the field; Preprocess adds the row id.

What a check depends on besides the row (the engine's own checks of params and ``model``, the
pipeline's ``output_schema``, whether media may appear) comes in a :class:`RowContext`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from llm_assets.rows import ROLES, dumps_params
from llm_assets.tasks.structured import check_structured_outputs

# What a row's ``tokenization_kwargs`` may set for the Tokenize stage, and the types expected.
TOKENIZATION_KWARGS = {"add_special_tokens": bool, "truncation": bool, "max_length": int}


@dataclass(frozen=True)
class RowContext:
    """What a task's row check needs besides the row: the pipeline's engine (its own checks),
    whether the pipeline reads media (PrepareMultimodal), and its output schema (a JSON schema
    for rows that set no structured output)."""

    engine: Any
    multimodal: bool = False
    output_schema: Optional[dict[str, Any]] = None


def check_request(row: dict[str, Any], context: RowContext) -> dict[str, Any]:
    """A chat or prompt request, as the model engines take it; returns the row as stored."""
    has_messages = row.get("messages") is not None
    has_prompt = isinstance(row.get("prompt"), str)
    if not has_messages and not has_prompt:
        raise ValueError(
            f"has neither 'messages' nor 'prompt' (columns: {sorted(row)}); expected "
            "messages=[{'role': 'user', 'content': '...'}] or prompt='...' (return it from preprocess)"
        )
    if has_messages:
        row["messages"] = check_messages(row["messages"], context.multimodal)
        if context.multimodal:
            # Stored as JSON text: one Parquet column cannot hold both a string and a list of parts as content.
            row["messages"] = json.dumps(row["messages"])
    elif not row["prompt"]:
        raise ValueError("'prompt' is empty")
    row["sampling_params"] = check_sampling_params(row.get("sampling_params"), context)
    if row.get("tokenization_kwargs") is not None:
        row["tokenization_kwargs"] = check_tokenization_kwargs(row["tokenization_kwargs"])
    if row.get("model") is not None:
        context.engine.check_model(row["model"])
    return check_pooling_params(row)


def check_messages(messages: Any, multimodal: bool = False) -> list[dict[str, Any]]:
    expected = "expected a non-empty list of {'role': ..., 'content': '...'} dicts"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"'messages' is {type(messages).__name__}: {expected}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{index}] is {message!r}: {expected}")
        if message["role"] not in ROLES:
            raise ValueError(f"messages[{index}].role is {message['role']!r}: expected one of {sorted(ROLES)}")
        content = message["content"]
        if isinstance(content, (list, tuple)):
            if not multimodal:
                raise ValueError(
                    f"messages[{index}].content is a list of content parts: expected the message's text "
                    "as a string (for image, audio and video parts enable prepare_multimodal_stage)"
                )
            content = [_check_part(f"messages[{index}].content[{j}]", part) for j, part in enumerate(content)]
        elif not isinstance(content, str):
            raise ValueError(
                f"messages[{index}].content is {type(content).__name__} {content!r:.40}: "
                "expected the message's text as a string"
            )
        checked.append({**message, "content": content})
    return checked


def _check_part(where: str, part: Any) -> dict[str, Any]:
    """An OpenAI content part; an ``image_pil`` becomes a PNG data URL (Parquet holds bytes, never
    a pickled object). Parts read from a file come with every key of the file's parts: unset ones are None."""
    from llm_assets.stages.media import ALL_PART_TYPES, pil_data_url

    if not isinstance(part, dict) or part.get("type") not in ALL_PART_TYPES:
        raise ValueError(f"{where} is {part!r:.80}: expected a dict whose 'type' is one of {list(ALL_PART_TYPES)}")
    part = {key: value for key, value in part.items() if value is not None}
    kind = part["type"]
    if kind not in part:
        raise ValueError(f"{where} has type {kind!r} and no {kind!r} field")
    if kind == "text" and not isinstance(part["text"], str):
        raise ValueError(f"{where}.text is {type(part['text']).__name__}: expected a string")
    if kind == "image_pil":
        if not hasattr(part["image_pil"], "save"):
            raise ValueError(f"{where}.image_pil is {type(part['image_pil']).__name__}: expected a PIL image")
        return {"type": "image_url", "image_url": {"url": pil_data_url(part["image_pil"])}}
    return part


def check_sampling_params(params: Any, context: RowContext) -> Optional[str]:
    """The row's sampling params as stored between stages (JSON text), the output schema applied."""
    try:
        encoded = dumps_params(params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"'sampling_params' {exc}") from exc
    if encoded is None and context.output_schema is None:
        return None
    decoded = json.loads(encoded) if encoded is not None else {}
    if context.output_schema is not None and decoded.get("structured_outputs") is None:
        decoded["structured_outputs"] = {"json": context.output_schema}
        encoded = dumps_params(decoded)
    if decoded.get("structured_outputs") is not None:
        check_structured_outputs(decoded["structured_outputs"])
    max_tokens = decoded.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"sampling_params.max_tokens is {max_tokens!r}: expected an integer >= 1")
    temperature = decoded.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
        raise ValueError(f"sampling_params.temperature is {temperature!r}: expected a number >= 0")
    for name in ("logprobs", "prompt_logprobs"):  # how many top tokens per position (-1: the whole vocabulary)
        value = decoded.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < -1):
            raise ValueError(f"sampling_params.{name} is {value!r}: expected an integer >= 0 (or -1)")
    if decoded.get("n", 1) != 1:
        raise ValueError("sampling_params.n must be 1 (one generation per row)")
    context.engine.check_sampling_params(decoded)
    return encoded


def check_tokenization_kwargs(kwargs: Any) -> str:
    """The row's tokenizer arguments (JSON text between stages, as sampling_params)."""
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"'tokenization_kwargs' is {type(kwargs).__name__}: "
            f"expected a dict with some of {sorted(TOKENIZATION_KWARGS)}"
        )
    for name, value in kwargs.items():
        expected = TOKENIZATION_KWARGS.get(name)
        if expected is None:
            raise ValueError(
                f"tokenization_kwargs.{name} is not supported: expected some of {sorted(TOKENIZATION_KWARGS)}"
            )
        if not isinstance(value, expected) or (expected is int and (isinstance(value, bool) or value < 1)):
            raise ValueError(
                f"tokenization_kwargs.{name} is {value!r}: "
                f"expected {'an integer >= 1' if expected is int else 'true or false'}"
            )
    return json.dumps(kwargs, sort_keys=True)


def check_pooling_params(row: dict[str, Any]) -> dict[str, Any]:
    """Embeddings' ``pooling_params``: JSON text between stages, as sampling_params."""
    if row.get("pooling_params") is not None:
        try:
            row["pooling_params"] = dumps_params(row["pooling_params"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"'pooling_params' {exc}") from exc
    return row
