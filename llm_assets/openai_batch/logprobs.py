"""The engine's ``logprobs`` column -> the ``logprobs`` of OpenAI's chat and text completion choices.

The column holds, per generated token, vLLM's entries ``{token_id, logprob, rank, decoded_token}``:
the sampled token and the N most likely (N = the row's ``sampling_params.logprobs``; rank 1 is the
most likely), so N or N+1 entries, the sampled token among them even when it is not in the top N.
OpenAI's shapes (``openai.types``: ``ChatCompletionTokenLogprob``, ``CompletionChoice.Logprobs``):

- chat: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}] * N}], "refusal": None}``
- completions: ``{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``, each
  ``top_logprobs`` dict holding the N most likely and the sampled token, as OpenAI documents.

One entry per generated token, as vLLM's own server writes them: a final end-of-sequence token is
listed too (its text is not in the content). ``text_offset`` counts characters from the start of
the generated text (vLLM's server without ``echo``).
"""

from __future__ import annotations

from typing import Any

from llm_assets.rows import ROW_ID, loads_params

# What OpenAI (and vLLM's server) write for a log-probability of -inf, which JSON cannot hold.
MIN_LOGPROB = -9999.0


def requested(row: dict[str, Any]) -> int | None:
    """How many top tokens per position the row asked the engine for (None: no log probabilities)."""
    params = row.get("sampling_params")
    if isinstance(params, str):  # JSON text between stages
        params = loads_params(params)
    return (params or {}).get("logprobs")


def missing(row: dict[str, Any]) -> str | None:
    """Why a finished row that asked for log probabilities cannot give them (an engine that returns
    none, as the HTTP engine), to export it as a failed request rather than with ``logprobs: null``."""
    if requested(row) is None:
        return None
    for column in ("logprobs", "generated_tokens"):
        if row.get(column) is None:
            return f"the request asked for log probabilities, but the engine returned no {column}"
    return None


def chat_logprobs(row: dict[str, Any]) -> dict[str, Any] | None:
    positions = _positions(row)
    if positions is None:
        return None
    content = [{**_token(sampled), "top_logprobs": [_token(entry) for entry in top]} for sampled, top in positions]
    return {"content": content, "refusal": None}


def completion_logprobs(row: dict[str, Any]) -> dict[str, Any] | None:
    positions = _positions(row)
    if positions is None:
        return None
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    offset = 0
    for sampled, top in positions:
        token = _text(sampled)
        tokens.append(token)
        token_logprobs.append(_logprob(sampled))
        # Keyed by text: two token ids with the same text keep the likelier one's entry, and the
        # sampled token is added last, only when it is not among the top N.
        alternatives: dict[str, float] = {}
        for entry in [*top, sampled]:
            alternatives.setdefault(_text(entry), _logprob(entry))
        top_logprobs.append(alternatives)
        text_offset.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def _positions(row: dict[str, Any]) -> list[tuple[dict, list[dict]]] | None:
    """Per generated token: (the sampled token's entry, the top N entries by rank); None when the
    row asked for no log probabilities (``missing`` has checked that a row which asked has them).
    Entries that do not match the tokens are an engine fault: it raises rather than export them."""
    top_n = requested(row)
    if top_n is None:
        return None
    column, tokens = row["logprobs"], row["generated_tokens"]
    if len(column) != len(tokens):
        raise ValueError(f"row {row[ROW_ID]!r}: {len(column)} logprobs positions for {len(tokens)} generated tokens")
    positions = []
    for index, (token_id, entries) in enumerate(zip(tokens, column)):
        sampled = next((entry for entry in entries or () if entry["token_id"] == token_id), None)
        if sampled is None:
            raise ValueError(
                f"row {row[ROW_ID]!r}: the logprobs of generated token {index} do not include it (token id {token_id})"
            )
        # vLLM ranks ties alike, so a sampled token outside the top N can share the Nth rank: cut at N.
        ranked = sorted(entries, key=lambda entry: (entry["rank"], -entry["logprob"]))
        top = ranked if top_n < 0 else [entry for entry in ranked if entry["rank"] <= top_n][:top_n]
        positions.append((sampled, top))
    return positions


def _text(entry: dict[str, Any]) -> str:
    # vLLM leaves decoded_token empty when the engine did not detokenize (a row whose params set
    # detokenize false); its server then names tokens "token_id:N", as here.
    text = entry.get("decoded_token")
    return text if text is not None else f"token_id:{entry['token_id']}"


def _logprob(entry: dict[str, Any]) -> float:
    return max(float(entry["logprob"]), MIN_LOGPROB)


def _token(entry: dict[str, Any]) -> dict[str, Any]:
    text = entry.get("decoded_token")
    # bytes: the token's UTF-8 bytes; null (as OpenAI allows) when there is no decoded text.
    return {
        "token": _text(entry),
        "logprob": _logprob(entry),
        "bytes": list(text.encode("utf-8")) if text is not None else None,
    }
