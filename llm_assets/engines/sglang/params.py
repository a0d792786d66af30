"""A row's ``sampling_params`` as SGLang takes them.

Rows name sampling parameters as vLLM's ``SamplingParams`` does everywhere in a pipeline
(OpenAI Batch files, structured outputs, the demo), so that a pipeline changes engine by changing
its config class. SGLang's own names are accepted too, as ray.data.llm's SGLang processor passes
them through: ``max_new_tokens``, ``min_new_tokens``, ``sampling_seed``, ``json_schema``,
``regex``, ``ebnf``, ``stop_regex``, ``no_stop_trim``. A field SGLang has no equivalent for is an
error naming it, found by Preprocess on CPU before any engine starts. Pure Python: no SGLang import.
"""

from __future__ import annotations

import json
import re
from typing import Any

# vLLM name -> SGLang name.
RENAMED = {
    "max_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "seed": "sampling_seed",
    "include_stop_str_in_output": "no_stop_trim",
}
# The same name and meaning in both.
SHARED = {
    "stop",
    "stop_token_ids",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "logit_bias",
    "n",
}
# SGLang's own names, taken as they are.
SGLANG_ONLY = {
    "max_new_tokens",
    "min_new_tokens",
    "sampling_seed",
    "json_schema",
    "regex",
    "ebnf",
    "stop_regex",
    "no_stop_trim",
    "structural_tag",
}
# Set by the pipeline for vLLM (the Detokenize stage does it); meaningless here.
IGNORED = {"detokenize"}
CONSTRAINT_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")


def to_sglang(params: dict[str, Any]) -> dict[str, Any]:
    """SGLang's sampling params for one row's (vLLM-named or SGLang-named) params; a ValueError
    names the field that has no SGLang equivalent or is given twice."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if value is None or name in IGNORED:
            continue
        if name == "structured_outputs":
            target, converted = _constraint(value)
        elif name in RENAMED:
            target, converted = RENAMED[name], value
        elif name in SHARED or name in SGLANG_ONLY:
            target, converted = name, value
        else:
            raise ValueError(
                f"sampling_params.{name} has no SGLang equivalent (SGLang takes: "
                f"{', '.join(sorted(set(RENAMED) | SHARED | SGLANG_ONLY | {'structured_outputs'}))})"
            )
        if target in out:
            raise ValueError(
                f"sampling_params.{name} sets SGLang's {target!r}, which another field of the row sets too"
            )
        out[target] = converted
    constraints = [name for name in CONSTRAINT_FIELDS if name in out]
    if len(constraints) > 1:
        raise ValueError(f"sampling_params sets {constraints}: SGLang takes one constraint per request")
    if out.get("n", 1) != 1:
        raise ValueError("sampling_params.n must be 1 (one generation per row)")
    out.pop("n", None)
    if "stop_token_ids" in out:
        out["stop_token_ids"] = list(out["stop_token_ids"])
    return out


def _constraint(value: dict[str, Any]) -> tuple[str, Any]:
    """vLLM's ``structured_outputs`` (one constraint, checked by Preprocess) as SGLang's field."""
    if value.get("json") is not None:
        schema = value["json"]
        return "json_schema", schema if isinstance(schema, str) else json.dumps(schema)
    if value.get("json_object"):
        return "json_schema", json.dumps({"type": "object"})
    if value.get("regex") is not None:
        return "regex", value["regex"]
    if value.get("choice") is not None:
        return "regex", "(" + "|".join(re.escape(choice) for choice in value["choice"]) + ")"
    if value.get("grammar") is not None:
        return "ebnf", value["grammar"]
    if value.get("structural_tag") is not None:
        return "structural_tag", value["structural_tag"]
    raise ValueError(f"sampling_params.structured_outputs {sorted(value)}: no constraint SGLang takes")


def check_row_params(params: dict[str, Any], text_in_engine: bool) -> None:
    """Preprocess's check for an SGLang pipeline: the row's params translate, and what SGLang does
    with its tokenizer (stop strings matched on text, grammars compiled against the vocabulary)
    has a tokenizer in the engine to do it with."""
    translated = to_sglang(params)
    if text_in_engine:
        return
    needs_tokenizer = [name for name in ("stop", "stop_regex", *CONSTRAINT_FIELDS) if translated.get(name)]
    if needs_tokenizer:
        raise ValueError(
            f"sampling_params sets {needs_tokenizer}, which SGLang handles with its own tokenizer, and the engine runs "
            "with skip_tokenizer_init=True here: set engine_kwargs={'skip_tokenizer_init': False} "
            "(or use stop_token_ids)"
        )
