"""OpenAI Batch input: request lines -> pipeline rows.

Input: an OpenAI Batch input JSONL file, one request per line::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_completion_tokens": 64}}

Each line becomes one pipeline row: ``row_id`` (the custom_id), ``messages`` or ``prompt``,
``sampling_params`` (vLLM ``SamplingParams`` names) and ``openai_url``/``openai_model`` (echoed by the
export). Chat and Responses requests become ``messages``: a Responses ``input`` string is a user
message and ``instructions`` a system message, as the Responses API defines them, so the chat
template applies as it would at OpenAI. Completions requests become a raw ``prompt``. Log
probabilities (chat ``logprobs``/``top_logprobs``, completions ``logprobs``) become vLLM's
``logprobs``. Anything the pipeline cannot honour (tools, response formats, several choices, the
Responses API's log probabilities, images) is refused with the file, line and field, before any
engine starts, rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from llm_assets.errors import SourceError
from llm_assets.openai_batch.problems import _Problem, _short
from llm_assets.openai_batch.sampling import chat_logprobs, completion_logprobs, no_logprobs, sampling_params
from llm_assets.openai_batch.urls import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, URLS
from llm_assets.rows import ROLES, ROW_ID

# The body field that carries the input, per endpoint.
INPUT_FIELD = {CHAT: "messages", COMPLETIONS: "prompt", RESPONSES: "input", EMBEDDINGS: "input"}

# Accepted but not used: the pipeline's model serves every row (the requested name is echoed),
# and user/metadata are bookkeeping for OpenAI.
_PASSIVE = {"model", "stream", "user", "metadata"}
BODY_FIELDS = {
    CHAT: _PASSIVE
    | {
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "top_logprobs",
    },
    COMPLETIONS: _PASSIVE
    | {
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
    },
    RESPONSES: _PASSIVE | {"input", "instructions", "max_output_tokens", "temperature", "top_p", "top_logprobs"},
    EMBEDDINGS: _PASSIVE | {"input", "encoding_format", "dimensions"},
}
LINE_FIELDS = ("custom_id", "method", "url", "body")
# Body fields accepted only at these values (one choice, no streaming, no Responses log probabilities).
_ONE_CHOICE = {"n": "1", "stream": "false"}
AT_DEFAULT_ONLY = {
    CHAT: _ONE_CHOICE,
    COMPLETIONS: _ONE_CHOICE,
    RESPONSES: {"top_logprobs": "0", "stream": "false"},
    EMBEDDINGS: {"stream": "false"},
}
# Each endpoint's way of asking for log probabilities -> vLLM's ``logprobs`` (embeddings: none).
_LOGPROBS = {CHAT: chat_logprobs, COMPLETIONS: completion_logprobs, RESPONSES: no_logprobs}

# Content parts that carry text: chat's "text", the Responses API's "input_text"/"output_text".
TEXT_PARTS = {"text", "input_text", "output_text"}


def is_openai_batch_line(obj: Any) -> bool:
    """Whether a parsed JSONL object looks like an OpenAI Batch request (custom_id, url and body)."""
    return isinstance(obj, dict) and all(key in obj for key in ("custom_id", "url", "body"))


class BadLine:
    """A line the reader could not parse, passed on so that the scan names it with the others."""

    def __init__(self, problem: str):
        self.problem = problem


# Bad lines named in one error, at most (the count says how many more).
PROBLEMS_LISTED = 20


def rows_from_openai_batch(lines: Iterable[tuple[int, Any]], source_name: str) -> Iterator[dict]:
    """Pipeline rows from ``(line number, parsed object or BadLine)`` pairs of a batch input file,
    lazily, so a reader can chunk them. After a bad line it reads on to the end and raises one ``SourceError``
    naming ``source_name`` and every bad line, so a user fixes the file in one go."""
    first_line_of: dict[str, int] = {}
    problems: list[str] = []
    for line_number, obj in lines:
        try:
            if isinstance(obj, BadLine):
                raise _Problem(obj.problem)
            row = request_to_row(obj)
            custom_id = row[ROW_ID]
            if custom_id in first_line_of:
                raise _Problem(
                    f"'custom_id' {custom_id!r} repeats line {first_line_of[custom_id]}; custom_id must be unique"
                )
        except _Problem as problem:
            problems.append(f"line {line_number}: {problem}")
            continue
        first_line_of[custom_id] = line_number
        if not problems:
            yield row
    if problems:
        more = f"; and {len(problems) - PROBLEMS_LISTED} more bad line(s)" if len(problems) > PROBLEMS_LISTED else ""
        lead = f"{len(problems)} bad request lines: " if len(problems) > 1 else ""
        raise SourceError(f"{source_name}: {lead}{'; '.join(problems[:PROBLEMS_LISTED])}{more}")


def request_to_row(obj: Any) -> dict[str, Any]:
    """One request line -> one row; raises ``_Problem`` (no line number: the caller knows it)."""
    if not isinstance(obj, dict):
        raise _Problem(f"expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in LINE_FIELDS:
            raise _Problem(f"unknown field {key!r}: a batch request line has only {', '.join(LINE_FIELDS)}")
    for key in LINE_FIELDS:
        if key not in obj:
            raise _Problem(f"{key!r} is missing: a batch request line needs {', '.join(LINE_FIELDS)}")
    custom_id, method, url, body = (obj[key] for key in LINE_FIELDS)
    if not isinstance(custom_id, str) or not custom_id:
        raise _Problem(f"'custom_id' is {_short(custom_id)}: expected a non-empty string")
    if method != "POST":
        raise _Problem(f"method {_short(method)}: expected 'POST'")
    if url not in URLS:
        raise _Problem(f"url {_short(url)} is not supported (expected one of {', '.join(map(repr, URLS))})")
    if not isinstance(body, dict):
        raise _Problem(f"'body' is {type(body).__name__}: expected a JSON object")
    _check_body_fields(url, body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _Problem(f"body 'model' is {_short(model)}: expected a string")
    if body.get("stream") not in (None, False):
        raise _Problem(
            f"body 'stream' is {_short(body['stream'])}: a batch request cannot stream (expected false or absent)"
        )

    row: dict[str, Any] = {ROW_ID: custom_id}
    if url == EMBEDDINGS:
        return {**row, **_embedding_request(body), "openai_url": url, "openai_model": model}
    if url == COMPLETIONS:
        row["prompt"] = _prompt(body["prompt"])
    elif url == CHAT:
        row["messages"] = _messages(body["messages"], "messages")
    else:
        row["messages"] = _responses_messages(body)
    params = {**sampling_params(body), **_LOGPROBS[url](body)}
    # None rather than {}: Arrow infers an empty dict as a struct without fields, which Parquet cannot store.
    row["sampling_params"] = params or None
    row["openai_url"] = url
    row["openai_model"] = model
    return row


def _embedding_request(body: dict[str, Any]) -> dict[str, Any]:
    """One text to embed per line (OpenAI also takes a list; a batch line is one row here)."""
    text = body["input"]
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str) or not text:
        raise _Problem(f"body 'input' is {_short(text)}: expected one non-empty string (one text per request line)")
    if body.get("encoding_format", "float") != "float":
        raise _Problem(f"body 'encoding_format' is {_short(body['encoding_format'])}: only 'float' is written")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1):
        raise _Problem(f"body 'dimensions' is {_short(dimensions)}: expected an integer >= 1")
    # None rather than {}, as for sampling_params: Parquet cannot store a struct without fields.
    return {"prompt": text, "pooling_params": {"dimensions": dimensions} if dimensions else None}


def _check_body_fields(url: str, body: dict[str, Any]) -> None:
    wanted = INPUT_FIELD[url]
    if wanted not in body:
        present = [field for field in INPUT_FIELD.values() if field in body]
        if not present:
            raise _Problem("body has neither 'messages', 'prompt' nor 'input'")
        raise _Problem(f"body has {present[0]!r}, but url {url!r} takes {wanted!r}")
    for key in body:
        if key not in BODY_FIELDS[url]:
            # Name only what is honoured; fields taken only at their default value are said so.
            honoured = sorted(BODY_FIELDS[url] - set(AT_DEFAULT_ONLY[url]))
            defaults = ", ".join(f"{field}={value}" for field, value in AT_DEFAULT_ONLY[url].items())
            raise _Problem(
                f"body field {key!r} is not supported for {url} (supported: {', '.join(honoured)}; "
                f"and only at their defaults: {defaults})"
            )


# --- inputs -------------------------------------------------------------------------------------


def _prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt:
        raise _Problem(f"body 'prompt' is {_short(prompt)}: expected a non-empty string (one prompt per request)")
    return prompt


def _messages(messages: Any, field: str) -> list[dict[str, str]]:
    expected = "expected a non-empty list of {'role': ..., 'content': ...} objects"
    if not isinstance(messages, list) or not messages:
        raise _Problem(f"body {field!r} is {_short(messages)}: {expected}")
    return [_message(message, f"{field}[{index}]") for index, message in enumerate(messages)]


def _message(message: Any, where: str) -> dict[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise _Problem(f"body {where} is {_short(message)}: expected {{'role': ..., 'content': ...}}")
    if message.get("type", "message") != "message":
        raise _Problem(f"body {where} has type {message['type']!r}: only messages are supported")
    # "name" is accepted and dropped, as most chat templates ignore it; other keys (tool calls)
    # would change the conversation, so they are refused.
    for key in message:
        if key not in ("role", "content", "type", "name"):
            raise _Problem(f"body {where} has {key!r}: only 'role' and 'content' are supported")
    role = message["role"]
    if role not in ROLES:
        raise _Problem(f"body {where} role {_short(role)} is not one of {sorted(ROLES)}")
    return {"role": role, "content": _text_content(message["content"], where)}


def _text_content(content: Any, where: str) -> str:
    """A message's text. Text-only content parts are joined into one string: the chat template and
    the Arrow column both want a string, the same type for every row."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _Problem(f"body {where} content is {_short(content)}: expected a string or a list of text parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            shown = repr(kind) if kind is not None else _short(part)
            raise _Problem(f"body {where} content part {shown} is not supported (text parts only)")
        texts.append(part["text"])
    return "".join(texts)


def _responses_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The Responses API's ``input`` (a string is one user message) after its ``instructions``
    (a system message)."""
    given = body["input"]
    if isinstance(given, str):
        if not given:
            raise _Problem("body 'input' is '': expected a non-empty string or a list of messages")
        messages = [{"role": "user", "content": given}]
    elif isinstance(given, list):
        messages = _messages(given, "input")
    else:
        raise _Problem(f"body 'input' is {_short(given)}: expected a string or a list of messages")
    instructions = body.get("instructions")
    if instructions is None:
        return messages
    if not isinstance(instructions, str):
        raise _Problem(f"body 'instructions' is {_short(instructions)}: expected a string")
    return [{"role": "system", "content": instructions}, *messages]
