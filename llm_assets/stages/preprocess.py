"""Preprocess: the user's row -> row function, then the checks every later stage relies on.

Runs first, on CPU, so a bad row fails here, before any engine starts.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import pyarrow as pa

from llm_assets.stages.base import ROW_ID, RowError, apply_row_fn, dumps_params, rows_of, table_of
from llm_assets.stages.structured import check_structured_outputs

STAGE = "preprocess"
ROLES = {"system", "user", "assistant", "tool", "developer"}


def _check_messages(row_id: Any, messages: Any, multimodal: bool = False) -> list[dict[str, Any]]:
    expected = "expected a non-empty list of {'role': ..., 'content': '...'} dicts"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RowError(row_id, STAGE, f"'messages' is {type(messages).__name__}: {expected}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(row_id, STAGE, f"messages[{index}] is {message!r}: {expected}")
        if message["role"] not in ROLES:
            raise RowError(row_id, STAGE, f"messages[{index}].role is {message['role']!r}: expected one of {sorted(ROLES)}")
        content = message["content"]
        if isinstance(content, (list, tuple)):
            if not multimodal:
                raise RowError(row_id, STAGE, f"messages[{index}].content is a list of content parts: expected the message's text "
                                              "as a string (for image, audio and video parts enable prepare_multimodal_stage)")
            content = [_check_part(row_id, f"messages[{index}].content[{j}]", part) for j, part in enumerate(content)]
        elif not isinstance(content, str):
            raise RowError(row_id, STAGE, f"messages[{index}].content is {type(content).__name__} {content!r:.40}: "
                                          "expected the message's text as a string")
        checked.append({**message, "content": content})
    return checked


def _check_part(row_id: Any, where: str, part: Any) -> dict[str, Any]:
    """An OpenAI content part; an ``image_pil`` becomes a PNG data URL (Parquet holds bytes, never
    a pickled object). Parts read from a file come with every key of the file's parts: unset ones are None."""
    from llm_assets.stages.media import ALL_PART_TYPES, pil_data_url

    if not isinstance(part, dict) or part.get("type") not in ALL_PART_TYPES:
        raise RowError(row_id, STAGE, f"{where} is {part!r:.80}: expected a dict whose 'type' is one of {list(ALL_PART_TYPES)}")
    part = {key: value for key, value in part.items() if value is not None}
    kind = part["type"]
    if kind not in part:
        raise RowError(row_id, STAGE, f"{where} has type {kind!r} and no {kind!r} field")
    if kind == "text" and not isinstance(part["text"], str):
        raise RowError(row_id, STAGE, f"{where}.text is {type(part['text']).__name__}: expected a string")
    if kind == "image_pil":
        if not hasattr(part["image_pil"], "save"):
            raise RowError(row_id, STAGE, f"{where}.image_pil is {type(part['image_pil']).__name__}: expected a PIL image")
        return {"type": "image_url", "image_url": {"url": pil_data_url(part["image_pil"])}}
    return part


def _check_sampling_params(row_id: Any, params: Any, output_schema: Optional[dict[str, Any]] = None,
                           params_check: Optional[Callable[[dict[str, Any]], None]] = None) -> Optional[str]:
    try:
        encoded = dumps_params(params)
    except (TypeError, ValueError) as exc:
        raise RowError(row_id, STAGE, f"'sampling_params' {exc}") from exc
    if encoded is None and output_schema is None:
        return None
    decoded = json.loads(encoded) if encoded is not None else {}
    if output_schema is not None and decoded.get("structured_outputs") is None:
        decoded["structured_outputs"] = {"json": output_schema}
        encoded = dumps_params(decoded)
    if decoded.get("structured_outputs") is not None:
        check_structured_outputs(row_id, decoded["structured_outputs"])
    max_tokens = decoded.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise RowError(row_id, STAGE, f"sampling_params.max_tokens is {max_tokens!r}: expected an integer >= 1")
    temperature = decoded.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
        raise RowError(row_id, STAGE, f"sampling_params.temperature is {temperature!r}: expected a number >= 0")
    for name in ("logprobs", "prompt_logprobs"):  # how many top tokens per position (-1: the whole vocabulary)
        value = decoded.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < -1):
            raise RowError(row_id, STAGE, f"sampling_params.{name} is {value!r}: expected an integer >= 0 (or -1)")
    if decoded.get("n", 1) != 1:
        raise RowError(row_id, STAGE, "sampling_params.n must be 1 (one generation per row)")
    if params_check is not None:  # the engine's own check (EngineSpec.params_check)
        try:
            params_check(decoded)
        except ValueError as exc:
            raise RowError(row_id, STAGE, str(exc)) from exc
    return encoded


# What a row's ``tokenization_kwargs`` may set for the Tokenize stage, and the types expected.
TOKENIZATION_KWARGS = {"add_special_tokens": bool, "truncation": bool, "max_length": int}


def _check_tokenization_kwargs(row_id: Any, kwargs: Any) -> str:
    """The row's tokenizer arguments (JSON text between stages, as sampling_params)."""
    if not isinstance(kwargs, dict):
        raise RowError(row_id, STAGE, f"'tokenization_kwargs' is {type(kwargs).__name__}: expected a dict with some of {sorted(TOKENIZATION_KWARGS)}")
    for name, value in kwargs.items():
        expected = TOKENIZATION_KWARGS.get(name)
        if expected is None:
            raise RowError(row_id, STAGE, f"tokenization_kwargs.{name} is not supported: expected some of {sorted(TOKENIZATION_KWARGS)}")
        if not isinstance(value, expected) or (expected is int and (isinstance(value, bool) or value < 1)):
            raise RowError(row_id, STAGE, f"tokenization_kwargs.{name} is {value!r}: expected {'an integer >= 1' if expected is int else 'true or false'}")
    return json.dumps(kwargs, sort_keys=True)


def _check_payload(row_id: Any, payload: Any, columns: list[str]) -> str:
    """The request body, stored as JSON text (rows' bodies differ; one Parquet schema cannot hold them)."""
    if not isinstance(payload, dict):
        got = "missing" if payload is None else f"{type(payload).__name__}"
        raise RowError(row_id, STAGE, f"'payload' is {got} (columns: {columns}): expected the request's JSON body as a dict, "
                                      "e.g. {'model': ..., 'messages': [...]} (return it from preprocess)")
    try:
        return json.dumps(payload)
    except (TypeError, ValueError) as exc:
        raise RowError(row_id, STAGE, f"'payload' is not JSON-serializable: {exc}") from exc


class PreprocessStage:
    """Apply ``fn(row) -> row`` and check that each row has what the engine takes: ``messages`` or
    ``prompt`` (model engines), or a ``payload`` object (an HTTP endpoint)."""

    NEEDS: tuple[str, ...] = ()  # whatever the input file has; the user function maps it
    ADDS = ("row_id", "messages|prompt|payload", "sampling_params")
    USER_FN = "preprocess"
    PROCESSOR_KWARGS = ("takes_payload", "output_schema", "task_type", "params_check", "row_check", "model_check", "multimodal")

    def __init__(self, fn: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None, takes_payload: bool = False,
                 output_schema: Optional[dict[str, Any]] = None, task_type: str = "generate",
                 params_check: Optional[Callable[[dict[str, Any]], None]] = None,
                 row_check: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None,
                 model_check: Optional[Callable[[Any], None]] = None, multimodal: bool = False):
        from llm_assets.openai_batch.requests import EMBEDDINGS  # here: openai_batch imports stages.base

        self.fn = fn
        self.task_type, self.embeddings_url = task_type, EMBEDDINGS
        self.takes_payload = takes_payload
        self.output_schema = output_schema  # a JSON schema for rows that set no structured output
        self.params_check = params_check  # the engine's own check of a row's params (EngineSpec.params_check)
        self.row_check = row_check  # an engine's check of rows of its own shape (EngineSpec.row_check)
        self.model_check = model_check  # the engine's check of a row's 'model' (a LoRA adapter: EngineSpec.model_check)
        # With PrepareMultimodal: content may be a list of parts, and messages are stored as JSON
        # text (one Parquet column cannot hold both a string and a list of parts as content).
        self.multimodal = multimodal

    def __call__(self, batch: pa.Table) -> pa.Table:
        return table_of([self._one(row) for row in rows_of(batch)])

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        row_id = row[ROW_ID]
        if self.fn is not None:
            row = apply_row_fn(self.fn, row, STAGE)
        if self.row_check is not None:
            try:
                return self.row_check(row)
            except ValueError as exc:
                raise RowError(row_id, STAGE, str(exc)) from None
        if self.takes_payload:
            row["payload"] = _check_payload(row_id, row.get("payload"), sorted(row))
            return row
        url = row.get("openai_url")  # a row of an OpenAI Batch file: its endpoint must be the task's
        if url is not None and not (self.task_type == "embed" if url == self.embeddings_url else self.task_type == "generate"):
            raise RowError(row_id, STAGE, f"is a {url} request, and this pipeline's task_type is {self.task_type!r}")
        if self.task_type == "score":  # a pair for a cross-encoder, not a prompt
            _check_pair(row_id, row)
            return _pooling_params(row_id, row)
        has_messages = row.get("messages") is not None
        has_prompt = isinstance(row.get("prompt"), str)
        if not has_messages and not has_prompt:
            raise RowError(
                row_id,
                STAGE,
                f"has neither 'messages' nor 'prompt' (columns: {sorted(row)}); expected "
                "messages=[{'role': 'user', 'content': '...'}] or prompt='...' (return it from preprocess)",
            )
        if has_messages:
            row["messages"] = _check_messages(row_id, row["messages"], self.multimodal)
            if self.multimodal:
                row["messages"] = json.dumps(row["messages"])
        elif not row["prompt"]:
            raise RowError(row_id, STAGE, "'prompt' is empty")
        row["sampling_params"] = _check_sampling_params(row_id, row.get("sampling_params"), self.output_schema, self.params_check)
        if row.get("tokenization_kwargs") is not None:
            row["tokenization_kwargs"] = _check_tokenization_kwargs(row_id, row["tokenization_kwargs"])
        if self.model_check is not None and row.get("model") is not None:
            try:
                self.model_check(row["model"])
            except ValueError as exc:
                raise RowError(row_id, STAGE, str(exc)) from None
        return _pooling_params(row_id, row)


def _pooling_params(row_id: Any, row: dict[str, Any]) -> dict[str, Any]:
    if row.get("pooling_params") is not None:  # embeddings: JSON text between stages, as sampling_params
        try:
            row["pooling_params"] = dumps_params(row["pooling_params"])
        except (TypeError, ValueError) as exc:
            raise RowError(row_id, STAGE, f"'pooling_params' {exc}") from exc
    return row


def _check_pair(row_id: Any, row: dict[str, Any]) -> None:
    from llm_assets.tasks.score import PAIR

    for name in PAIR:
        if not isinstance(row.get(name), str) or not row[name]:
            raise RowError(row_id, STAGE, f"'{name}' is {row.get(name)!r}: task_type='score' scores a pair of non-empty strings, "
                                          f"{' and '.join(map(repr, PAIR))} (return them from preprocess)")
