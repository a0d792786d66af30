"""OpenAI Batch output: one output or error file line per finished row.

Both files have the same line shape, OpenAI's: a successful request's body is the endpoint's own
object (``chat.completion``, ``text_completion``, or a Responses ``response``; ``logprobs`` shapes
the log probabilities a request asked for) with status 200; a
failed request's body is ``{"error": {message, type, param, code}}`` with a 400 (the request's
fault: ``context_length_exceeded``, invalid parameters) or 500 status, its message never echoing
the prompt. The ``model`` of a body is the model that answered.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from llm_assets.openai_batch import logprobs
from llm_assets.openai_batch.urls import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, URLS
from llm_assets.rows import ERROR_COLUMN, ROW_ID

# The engine's finish reasons that OpenAI's objects have; any other ("abort") is not a finished
# answer and exports as an error. A row without one (an engine that did not report it) counts as "stop".
FINISH_REASONS = {"stop", "length"}


def output_line(row: dict[str, Any], default_model: str, created: int, namespace: str = "") -> dict[str, Any]:
    """One output or error file line for a finished row (an error line's status is not 200).
    ``namespace`` (the output path) keeps ids of equal custom_ids in different files apart."""
    custom_id = str(row[ROW_ID])
    line_id = f"batch_req_{_stable_id(namespace, custom_id)}"
    error = row.get(ERROR_COLUMN) or None  # "" is a good row's, as in ray.data.llm
    finish_reason = row.get("finish_reason") or "stop"
    if error is None and finish_reason not in FINISH_REASONS:
        error = f"the engine stopped the request before it finished (finish_reason {finish_reason!r})"
    if error is None:
        error = logprobs.missing(row)
    if error is not None:
        status, body = _failure(str(error))
    else:
        url = row.get("openai_url") or CHAT  # rows not read from a batch file export as chat completions
        if url not in _BODIES:
            raise ValueError(f"row {custom_id!r}: openai_url {url!r} is not one of {', '.join(URLS)}")
        # The model that answered, whatever the request named (the pipeline's model serves every row).
        status, body = 200, _BODIES[url](row, default_model, created, _stable_id("body", namespace, custom_id))
    response = {"status_code": status, "request_id": _stable_id("request", namespace, custom_id), "body": body}
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": None}


# What the engine said -> OpenAI's status, error type and code for a failed request.
_FAILURES = (
    (
        ("maximum context length", "longer than the maximum model length"),
        400,
        "invalid_request_error",
        "context_length_exceeded",
    ),
    (("SamplingParams", "sampling_params", "must be"), 400, "invalid_request_error", None),
)
# The engine's row errors end with the start of the prompt; an error file never echoes it.
_PROMPT_SUFFIX = re.compile(r" \(prompt: .*\)$", re.DOTALL)


def _failure(error: str) -> tuple[int, dict[str, Any]]:
    """A failed request's status and body, in the shape of OpenAI's failed batch requests."""
    message = _PROMPT_SUFFIX.sub("", error)
    status, kind, code = 500, "server_error", None
    for patterns, found_status, found_kind, found_code in _FAILURES:
        if any(pattern in message for pattern in patterns):
            status, kind, code = found_status, found_kind, found_code
            break
    return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _stable_id(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


def _tokens(row: dict[str, Any]) -> tuple[int, int]:
    return int(row.get("num_input_tokens") or 0), int(row.get("num_generated_tokens") or 0)


def _usage(row: dict[str, Any]) -> dict[str, int]:
    prompt_tokens, completion_tokens = _tokens(row)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_completion(row: dict[str, Any], model: str, created: int, body_id: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{body_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": row.get("generated_text") or "", "refusal": None},
                "logprobs": logprobs.chat_logprobs(row),
                "finish_reason": row.get("finish_reason") or "stop",
            }
        ],
        "usage": _usage(row),
    }


def _text_completion(row: dict[str, Any], model: str, created: int, body_id: str) -> dict[str, Any]:
    return {
        "id": f"cmpl-{body_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": row.get("generated_text") or "",
                "logprobs": logprobs.completion_logprobs(row),
                "finish_reason": row.get("finish_reason") or "stop",
            }
        ],
        "usage": _usage(row),
    }


def _response(row: dict[str, Any], model: str, created: int, body_id: str) -> dict[str, Any]:
    """A Responses API ``response`` object: what a /v1/responses client parses, not a chat completion."""
    input_tokens, output_tokens = _tokens(row)
    truncated = row.get("finish_reason") == "length"
    status = "incomplete" if truncated else "completed"
    return {
        "id": f"resp_{body_id}",
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": f"msg_{body_id}",
                "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": row.get("generated_text") or "", "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def _embedding(row: dict[str, Any], model: str, created: int, body_id: str) -> dict[str, Any]:
    """An embeddings ``list`` object, as /v1/embeddings answers (``created``, ``body_id``: unused there)."""
    tokens = int(row.get("num_input_tokens") or 0)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": row.get("embeddings")}],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


_BODIES = {CHAT: _chat_completion, COMPLETIONS: _text_completion, RESPONSES: _response, EMBEDDINGS: _embedding}
