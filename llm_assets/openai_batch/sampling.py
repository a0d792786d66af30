"""vLLM ``SamplingParams`` from an OpenAI Batch request body; fields the pipeline cannot honour
(several choices, the Responses API's log probabilities) are refused."""

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


_CHECKS: dict[str, Callable[[str, Any], None]] = {"n": _one_choice}
_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1, low_open=True),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "seed": _seed,
    "stop": _stop,
}


# --- log probabilities --------------------------------------------------------------------------
# Each endpoint spells the request its own way; vLLM takes one number, the top tokens per position
# besides the sampled one (0: the sampled token only). The results module shapes the answer back.
CHAT_TOP_LOGPROBS_MAX = 20  # OpenAI's limits
COMPLETION_LOGPROBS_MAX = 5


def chat_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """Chat completions: ``logprobs: true`` asks, ``top_logprobs`` (0..20, needs ``logprobs: true``)
    says how many alternatives per position."""
    asked, top = body.get("logprobs"), body.get("top_logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise _Problem(f"body 'logprobs' is {_short(asked)}: expected true or false")
    if top is not None and (not _is_int(top) or not 0 <= top <= CHAT_TOP_LOGPROBS_MAX):
        raise _Problem(f"body 'top_logprobs' is {_short(top)}: expected an integer from 0 to {CHAT_TOP_LOGPROBS_MAX}")
    if not asked:
        if top:  # as OpenAI and vLLM's server: 0 asks for nothing, more needs logprobs
            state = "absent" if asked is None else "false"
            raise _Problem(
                f"body 'top_logprobs' is {top} but 'logprobs' is {state}: set 'logprobs' to true to get them"
            )
        return {}
    return _vllm_logprobs(top or 0)


def completion_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """Completions: ``logprobs: N`` (0..5) asks for the sampled token and the N most likely."""
    top = body.get("logprobs")
    if top is None:
        return {}
    if not _is_int(top) or not 0 <= top <= COMPLETION_LOGPROBS_MAX:
        raise _Problem(f"body 'logprobs' is {_short(top)}: expected an integer from 0 to {COMPLETION_LOGPROBS_MAX}")
    return _vllm_logprobs(top)


def no_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """The Responses API: its log probabilities come with ``include``, which is not supported, so a
    ``top_logprobs`` above 0 would silently get none."""
    top = body.get("top_logprobs")
    if top is not None and not (_is_int(top) and top == 0):
        raise _Problem(
            f"body 'top_logprobs' is {_short(top)}: log probabilities of /v1/responses are not returned "
            "by this pipeline (expected 0 or absent)"
        )
    return {}


def _vllm_logprobs(top: int) -> dict[str, Any]:
    # detokenize: with a Detokenize stage the engine otherwise skips detokenizing, and vLLM then
    # leaves each logprob's decoded_token empty: the export needs the token texts.
    return {"logprobs": top, "detokenize": True}
