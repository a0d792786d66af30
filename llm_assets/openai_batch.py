"""OpenAI Batch API files: request lines in, output and error files out.

Input: an OpenAI Batch input JSONL file, one request per line::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_completion_tokens": 64}}

Each line becomes one pipeline row: ``row_id`` (the custom_id), ``messages`` or ``prompt``,
``sampling_params`` (vLLM ``SamplingParams`` names) and ``openai_url``/``openai_model`` (echoed by the
export). Chat and Responses requests become ``messages``: a Responses ``input`` string is a user
message and ``instructions`` a system message, as the Responses API defines them, so the chat
template applies as it would at OpenAI. Completions requests become a raw ``prompt``. Anything the
pipeline cannot honour (tools, response formats, several choices, log probabilities, images) is
refused with the file, line and field, before any engine starts, rather than silently ignored.

Output: the files OpenAI writes for a batch. Following OpenAI's documentation (the batch's
``output_file_id`` holds "the outputs of successfully executed requests", its ``error_file_id``
"the outputs of requests with errors"), each custom_id appears in exactly one of them: a
successful row in the output file, a failed row (``__inference_error__`` set) only in the error
file. Both have the same line shape; the body is the endpoint's own object (``chat.completion``,
``text_completion``, or a Responses ``response``). Unlike OpenAI, which creates no error file for
a batch without errors, the error file is always written (empty then), so a re-export never leaves
a stale error file from an earlier attempt next to a fresh output file.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from llm_assets.sources import SourceError
from llm_assets.stages.base import ERROR_COLUMN, ROW_ID
from llm_assets.stages.preprocess import ROLES

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
URLS = (CHAT, COMPLETIONS, RESPONSES)

# The body field that carries the input, per endpoint.
INPUT_FIELD = {CHAT: "messages", COMPLETIONS: "prompt", RESPONSES: "input"}

# Accepted but not used: the pipeline's model serves every row (the requested name is echoed),
# and user/metadata are bookkeeping for OpenAI.
_PASSIVE = {"model", "stream", "user", "metadata"}
BODY_FIELDS = {
    CHAT: _PASSIVE | {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
                      "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs"},
    COMPLETIONS: _PASSIVE | {"prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
                             "frequency_penalty", "logprobs"},
    RESPONSES: _PASSIVE | {"input", "instructions", "max_output_tokens", "temperature", "top_p", "top_logprobs"},
}
LINE_FIELDS = ("custom_id", "method", "url", "body")
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

# Content parts that carry text: chat's "text", the Responses API's "input_text"/"output_text".
TEXT_PARTS = {"text", "input_text", "output_text"}


class _Problem(ValueError):
    """What is wrong with one line; the reader adds the file and line number."""


def is_openai_batch_line(obj: Any) -> bool:
    """Whether a parsed JSONL object looks like an OpenAI Batch request (custom_id, url and body)."""
    return isinstance(obj, dict) and all(key in obj for key in ("custom_id", "url", "body"))


def rows_from_openai_batch(lines: Iterable[tuple[int, dict]], source_name: str) -> Iterator[dict]:
    """Pipeline rows from ``(line number, parsed object)`` pairs of a batch input file, lazily, so a
    reader can chunk them. Raises ``SourceError`` naming ``source_name`` and the line."""
    first_line_of: dict[str, int] = {}
    for line_number, obj in lines:
        try:
            row = request_to_row(obj)
            custom_id = row[ROW_ID]
            if custom_id in first_line_of:
                raise _Problem(f"'custom_id' {custom_id!r} repeats line {first_line_of[custom_id]}; custom_id must be unique")
        except _Problem as problem:
            raise SourceError(f"{source_name}: line {line_number}: {problem}") from None
        first_line_of[custom_id] = line_number
        yield row


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
        raise _Problem(f"body 'stream' is {_short(body['stream'])}: a batch request cannot stream (expected false or absent)")

    row: dict[str, Any] = {ROW_ID: custom_id}
    if url == COMPLETIONS:
        row["prompt"] = _prompt(body["prompt"])
    elif url == CHAT:
        row["messages"] = _messages(body["messages"], "messages")
    else:
        row["messages"] = _responses_messages(body)
    # None rather than {}: Arrow infers an empty dict as a struct without fields, which Parquet cannot store.
    row["sampling_params"] = sampling_params(body) or None
    row["openai_url"] = url
    row["openai_model"] = model
    return row


def _check_body_fields(url: str, body: dict[str, Any]) -> None:
    wanted = INPUT_FIELD[url]
    if wanted not in body:
        present = [field for field in INPUT_FIELD.values() if field in body]
        if not present:
            raise _Problem("body has neither 'messages', 'prompt' nor 'input'")
        raise _Problem(f"body has {present[0]!r}, but url {url!r} takes {wanted!r}")
    for key in body:
        if key not in BODY_FIELDS[url]:
            raise _Problem(f"body field {key!r} is not supported for {url} (supported: {', '.join(sorted(BODY_FIELDS[url]))})")


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


# --- sampling params ----------------------------------------------------------------------------


def sampling_params(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM ``SamplingParams`` fields from a request body. Values get one type per field (floats as
    float, ``stop`` always a list), so rows with different spellings still make one Arrow column."""
    params: dict[str, Any] = {}
    max_tokens = _max_tokens(body)
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for field, check in _CHECKS.items():
        if body.get(field) is not None:
            check(field, body[field])
    for field, convert in _CONVERTERS.items():
        if body.get(field) is not None:
            params[field] = convert(field, body[field])
    return params


def _max_tokens(body: dict[str, Any]) -> int | None:
    given = {field: body[field] for field in MAX_TOKENS_FIELDS if body.get(field) is not None}
    for field, value in given.items():
        if not _is_int(value) or value < 1:
            raise _Problem(f"body {field!r} is {_short(value)}: expected an integer >= 1")
    if len(set(given.values())) > 1:
        (first, a), (second, b) = list(given.items())[:2]
        raise _Problem(f"body {first!r} {a} and {second!r} {b} differ; give one of them")
    return next(iter(given.values()), None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(low: float, high: float, low_open: bool = False) -> Callable[[str, Any], float]:
    def convert(field: str, value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value > high or (value <= low if low_open else value < low):
            bound = f"> {low}" if low_open else f">= {low}"
            raise _Problem(f"body {field!r} is {_short(value)}: expected a number {bound} and <= {high}")
        return float(value)

    return convert


def _seed(field: str, value: Any) -> int:
    if not _is_int(value):
        raise _Problem(f"body {field!r} is {_short(value)}: expected an integer")
    return value


def _stop(field: str, value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise _Problem(f"body {field!r} is {_short(value)}: expected a string or a list of strings")
    return stops


# Fields that only need checking: what they ask for is vLLM's default, or cannot be given.


def _one_choice(field: str, value: Any) -> None:
    if value != 1 or not _is_int(value):
        raise _Problem(f"body {field!r} is {_short(value)}: expected 1 or absent (one generation per request)")


def _no_logprobs(field: str, value: Any) -> None:
    # The engine stage returns no log probabilities: asking for them would silently get none.
    if (field == "logprobs" and value is False) or (field == "top_logprobs" and _is_int(value) and value == 0):
        return
    expected = "0 or absent" if field == "top_logprobs" else "false or absent"
    raise _Problem(f"body {field!r} is {_short(value)}: log probabilities are not returned by this pipeline (expected {expected})")


_CHECKS: dict[str, Callable[[str, Any], None]] = {"n": _one_choice, "logprobs": _no_logprobs, "top_logprobs": _no_logprobs}
_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1, low_open=True),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "seed": _seed,
    "stop": _stop,
}


def _short(value: Any) -> str:
    """A value for an error message: JSON's spelling of true, false and null (what the user wrote),
    else its repr when short, else its type."""
    text = json.dumps(value) if value is None or isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


# --- output -------------------------------------------------------------------------------------

# The engine's finish reasons that OpenAI's objects have; any other ("abort") is not a finished
# answer and exports as an error. A row without one (an engine that did not report it) counts as "stop".
FINISH_REASONS = {"stop", "length"}


def export_openai_batch(
    batches: Iterable[pa.Table],
    filesystem: pafs.FileSystem,
    output_path: str,
    error_path: str,
    default_model: str,
    created: int | None = None,
) -> dict[str, int]:
    """Write the OpenAI Batch output file (successful rows) and error file (failed rows) from the
    final stage's batches, in their order. Each file appears whole or not at all. Returns
    ``{"total", "completed", "failed"}``, like a batch's ``request_counts``.

    ``created`` (Unix seconds, default now) goes into every body; the ids are hashes of
    ``output_path`` and the custom_id, so a re-export writes the same ids, and one custom_id used
    in two input files gets two ids.
    """
    if output_path == error_path:
        raise ValueError(f"output_path and error_path are both {output_path!r}: they must differ")
    created = int(time.time()) if created is None else created
    counts = {"total": 0, "completed": 0, "failed": 0}
    staged: list[_StagedFile] = []
    try:
        output = _StagedFile(filesystem, output_path)
        staged.append(output)
        errors = _StagedFile(filesystem, error_path)
        staged.append(errors)
        for batch in batches:
            ok_lines, error_lines = [], []
            for row in _rows_for_export(batch):
                line = output_line(row, default_model, created, output_path)
                (ok_lines if line["error"] is None else error_lines).append(line)
            output.write(ok_lines)
            errors.write(error_lines)
            counts["completed"] += len(ok_lines)
            counts["failed"] += len(error_lines)
        # The output file last: once it is there, so is its error file.
        errors.publish()
        output.publish()
    finally:
        for file in staged:
            file.discard()
    counts["total"] = counts["completed"] + counts["failed"]
    return counts


_EXPORT_COLUMNS = (ROW_ID, "generated_text", "num_input_tokens", "num_generated_tokens", "finish_reason")
_OPTIONAL_COLUMNS = (ERROR_COLUMN, "openai_url", "openai_model")


def _rows_for_export(batch: pa.Table) -> list[dict[str, Any]]:
    missing = [name for name in _EXPORT_COLUMNS if name not in batch.column_names]
    if missing:
        raise ValueError(f"cannot export an OpenAI batch file: the rows have no {missing} column(s) (columns: {batch.column_names})")
    present = [name for name in _EXPORT_COLUMNS + _OPTIONAL_COLUMNS if name in batch.column_names]
    return batch.select(present).to_pylist()


def output_line(row: dict[str, Any], default_model: str, created: int, namespace: str = "") -> dict[str, Any]:
    """One output or error file line for a finished row (error lines have ``"error"`` set).
    ``namespace`` (the output path) keeps ids of equal custom_ids in different files apart."""
    custom_id = str(row[ROW_ID])
    line_id = f"batch_req_{_stable_id(namespace, custom_id)}"
    error = row.get(ERROR_COLUMN)
    finish_reason = row.get("finish_reason") or "stop"
    if error is None and finish_reason not in FINISH_REASONS:
        error = f"the engine stopped the request before it finished (finish_reason {finish_reason!r})"
    if error is not None:
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": "inference_error", "message": str(error)}}
    url = row.get("openai_url") or CHAT  # rows not read from a batch file export as chat completions
    if url not in _BODIES:
        raise ValueError(f"row {custom_id!r}: openai_url {url!r} is not one of {', '.join(URLS)}")
    body = _BODIES[url](row, row.get("openai_model") or default_model, created, _stable_id("body", namespace, custom_id))
    response = {"status_code": 200, "request_id": _stable_id("request", namespace, custom_id), "body": body}
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": None}


def _stable_id(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


def _tokens(row: dict[str, Any]) -> tuple[int, int]:
    return int(row.get("num_input_tokens") or 0), int(row.get("num_generated_tokens") or 0)


def _usage(row: dict[str, Any]) -> dict[str, int]:
    prompt_tokens, completion_tokens = _tokens(row)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _chat_completion(row: dict[str, Any], model: str, created: int, body_id: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{body_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": row.get("generated_text") or "", "refusal": None},
            "logprobs": None,
            "finish_reason": row.get("finish_reason") or "stop",
        }],
        "usage": _usage(row),
    }


def _text_completion(row: dict[str, Any], model: str, created: int, body_id: str) -> dict[str, Any]:
    return {
        "id": f"cmpl-{body_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": row.get("generated_text") or "", "logprobs": None,
                     "finish_reason": row.get("finish_reason") or "stop"}],
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
        "output": [{
            "type": "message",
            "id": f"msg_{body_id}",
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": row.get("generated_text") or "", "annotations": []}],
        }],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": input_tokens + output_tokens},
    }


_BODIES = {CHAT: _chat_completion, COMPLETIONS: _text_completion, RESPONSES: _response}

# Object stores have no rename, but an object written through open_output_stream appears only
# when the stream closes, complete: there the file is staged locally and uploaded in one stream.
_OBJECT_STORES = {"s3", "gcs", "abfs"}


class _StagedFile:
    """A file that becomes visible at ``path`` only on ``publish()``: written to a temporary file
    beside it and renamed into place, or on an object store spooled locally and uploaded in one go
    (a failed run then never leaves a partial object behind)."""

    def __init__(self, filesystem: pafs.FileSystem, path: str):
        self.filesystem, self.path = filesystem, path
        self.temp_path: str | None = None
        if _base(filesystem).type_name in _OBJECT_STORES:
            # Held open across writes until publish or discard, which close (and so delete) it.
            self.stream: Any = tempfile.TemporaryFile(prefix="llm-assets-openai-batch-")  # noqa: SIM115
        else:
            parent, name = posixpath.split(path)
            if parent:
                filesystem.create_dir(parent, recursive=True)
            self.temp_path = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
            self.stream = filesystem.open_output_stream(self.temp_path)
        self.published = False

    def write(self, lines: list[dict[str, Any]]) -> None:
        if lines:
            self.stream.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8"))

    def publish(self) -> None:
        if self.temp_path is None:
            self.stream.seek(0)
            with self.filesystem.open_output_stream(self.path) as out:
                while chunk := self.stream.read(8 << 20):
                    out.write(chunk)
            self.stream.close()
        else:
            self.stream.close()
            self.filesystem.move(self.temp_path, self.path)
        self.published = True

    def discard(self) -> None:
        """Drop what was staged but not published (after an error); a no-op after publish."""
        if self.published:
            return
        self.stream.close()
        if self.temp_path is not None:
            try:
                self.filesystem.delete_file(self.temp_path)
            except FileNotFoundError:
                pass


def _base(filesystem: pafs.FileSystem) -> pafs.FileSystem:
    while isinstance(filesystem, pafs.SubTreeFileSystem):
        filesystem = filesystem.base_fs
    return filesystem
