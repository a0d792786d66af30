"""vLLM ``SamplingParams`` from an OpenAI Batch request body; fields the pipeline cannot honour
(several choices, log probabilities) are refused."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from llm_assets.openai_batch.problems import _Problem, _short

MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


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
