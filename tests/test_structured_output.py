"""Structured output on the demo model (SmolLM2-135M) through a real Dagster run: a pipeline's
output_schema (a pydantic model) for rows that set none, and rows with a constraint of their own."""

import json
import re
from typing import Literal

import pyarrow as pa
import pytest
from pydantic import BaseModel, Field

from llm_assets.demo import smollm2_gguf_path
from llm_assets.pipeline import LLMPipeline
from llm_assets.rows import RowError
from llm_assets.sources import LocalFolderSource
from tests.helpers.data import write_jsonl
from tests.helpers.pipelines import make_resources, run_job
from tests.helpers.stages import preprocess_stage


class Pick(BaseModel):
    color: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=9)


OWN = {"yes-no": {"choice": ["yes", "no"]}, "digits": {"regex": "[0-9]{3}"}}


def to_chat(row):
    params = {"max_tokens": 48, "temperature": 0}
    if row["kind"] in OWN:
        params["structured_outputs"] = OWN[row["kind"]]
    return {"kind": row["kind"], "messages": [{"role": "user", "content": row["question"]}], "sampling_params": params}


def test_output_schema_and_per_row_constraints(tmp_path, ray_session, instance):
    rows = [{"kind": "schema", "question": f"Pick a color and a count for item {i}."} for i in range(4)]
    rows += [{"kind": "yes-no", "question": "Is the sky blue?"}, {"kind": "digits", "question": "Give a number."}]
    write_jsonl(tmp_path / "landing" / "a.jsonl", rows)
    pipeline = LLMPipeline(
        "tiny",
        {"model_source": smollm2_gguf_path(), "engine_kwargs": {"max_model_len": 512}, "batch_size": 8},
        LocalFolderSource(str(tmp_path / "landing")),
        preprocess=to_chat,
        output_schema=Pick,
    )
    result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"})
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"].store()
    out = [r for t in storage.read_committed("tiny", "postprocess", "a.jsonl") for r in t.to_pylist()]
    assert len(out) == 6
    for row in out:
        text = row["generated_text"]
        if row["kind"] == "schema":
            Pick.model_validate_json(text)
        elif row["kind"] == "yes-no":
            assert text in ("yes", "no")
        else:
            assert re.fullmatch("[0-9]{3}", text)
    check = next(
        e.dagster_event.event_specific_data
        for e in instance.all_logs(result.run_id)
        if e.dagster_event
        and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.dagster_event.event_specific_data.check_name == "schema_valid"
    )
    assert check.passed and check.metadata["rows_parsed"].value == 4 and check.metadata["invalid_rows"].value == 0


@pytest.mark.parametrize(
    "constraint, problem",
    [
        ({"json": {"type": "object"}, "regex": "a+"}, "sets ['json', 'regex']: expected exactly one"),
        ({"choice": []}, "structured_outputs.choice is []: expected a non-empty list of strings"),
        ({"regex": 5}, "structured_outputs.regex is int: expected str"),
        ({"jsn": {}}, "unknown field(s) ['jsn']"),
    ],
)
def test_a_bad_constraint_fails_preprocess_naming_the_row_and_field(constraint, problem):
    stage = preprocess_stage(lambda row: {"prompt": "hi", "sampling_params": {"structured_outputs": constraint}})
    with pytest.raises(RowError) as caught:
        stage(pa.table({"row_id": ["r1"], "q": ["x"]}))
    assert "row 'r1'" in str(caught.value) and problem in str(caught.value)


def test_output_schema_must_be_a_pydantic_model(tmp_path):
    with pytest.raises(TypeError, match="expected a pydantic model class"):
        LLMPipeline("tiny", {"model_source": "m"}, LocalFolderSource(str(tmp_path)), output_schema={"type": "object"})
    schema = preprocess_stage(output_schema=Pick)(pa.table({"row_id": ["r1"], "prompt": ["hi"]}))
    assert json.loads(schema.column("sampling_params")[0].as_py())["structured_outputs"] == {
        "json": Pick.model_json_schema()
    }
