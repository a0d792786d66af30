"""Structured output: a row's ``sampling_params.structured_outputs``, checked in Preprocess (by the
task's row check, ``tasks/requests.py``).

The field is vLLM's ``StructuredOutputsParams`` as a dict, one constraint per row: ``json`` (a
JSON schema, dict or text), ``regex``, ``choice`` (a list of strings), ``grammar`` (EBNF),
``json_object`` (any JSON object) or ``structural_tag``, plus vLLM's options. A pipeline's
``output_schema`` (a pydantic model) gives every row that sets none the model's JSON schema.
"""

from __future__ import annotations

from typing import Any

CONSTRAINTS = {
    "json": (dict, str),
    "regex": (str,),
    "choice": (list,),
    "grammar": (str,),
    "json_object": (bool,),
    "structural_tag": (str,),
}
OPTIONS = {"disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"}


def check_structured_outputs(value: Any) -> None:
    """Raise a ValueError naming the field unless ``value`` is one constraint vLLM takes."""
    where = "sampling_params.structured_outputs"
    if not isinstance(value, dict):
        raise ValueError(f"{where} is {type(value).__name__}: expected a dict with one of {sorted(CONSTRAINTS)}")
    unknown = sorted(set(value) - set(CONSTRAINTS) - OPTIONS)
    if unknown:
        raise ValueError(
            f"{where} has unknown field(s) {unknown}: "
            f"expected one of {sorted(CONSTRAINTS)} and options {sorted(OPTIONS)}"
        )
    given = [name for name in CONSTRAINTS if value.get(name) is not None]
    if len(given) != 1:
        raise ValueError(f"{where} sets {given or 'no constraint'}: expected exactly one of {sorted(CONSTRAINTS)}")
    name = given[0]
    if not isinstance(value[name], CONSTRAINTS[name]):
        expected = " or ".join(t.__name__ for t in CONSTRAINTS[name])
        raise ValueError(f"{where}.{name} is {type(value[name]).__name__}: expected {expected}")
    if name == "choice" and (not value["choice"] or not all(isinstance(c, str) for c in value["choice"])):
        raise ValueError(f"{where}.choice is {value['choice']!r:.60}: expected a non-empty list of strings")


def json_schema(model: Any) -> dict[str, Any]:
    """The JSON schema of a pydantic model (the pipeline's ``output_schema``)."""
    schema = getattr(model, "model_json_schema", None)
    if schema is None:
        raise TypeError(f"output_schema is {model!r}: expected a pydantic model class")
    return schema()
