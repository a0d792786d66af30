"""A pipeline declared in YAML, as a user makes one: `dg scaffold defs llm_assets.LLMPipelineComponent`,
its defs.yaml filled in, `dg check defs`, `dg list defs`, then a partition materialized by
`dagster job execute` as scaffolded, on the bundled demo model (SmolLM2) on vLLM's CPU engine.

Each test works on a copy of this repo's code location (definitions.py, pyproject.toml with its
[tool.dg], workspace.yaml, pipelines/) in a temporary folder, so nothing is left in the repo;
llm_assets and resources come from the installed package.
"""

import json
import sys
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml

from llm_assets import LLMPipelineComponent
from llm_assets.defs.component import LLMPipelineScaffolder
from tests.helpers.data import write_jsonl
from tests.helpers.project import BIN, code_location_copy, run, scaffold, set_attributes

QUESTIONS = [{"text": f"question {i}: say something about the number {i}"} for i in range(6)]


def committed_rows(project: Path, pipeline: str, stage: str, partition: str) -> list[dict]:
    folder = project / "storage" / pipeline / stage / partition
    manifest = json.loads((folder / "_manifest.json").read_text())
    return pq.read_table([str(folder / name) for name in manifest["files"]]).to_pylist()


@pytest.mark.slow
def test_a_scaffolded_yaml_pipeline_is_checked_listed_and_materialized(tmp_path):
    project = code_location_copy(tmp_path)
    components = run([str(BIN / "dg"), "list", "components", "--json"], project)
    assert components.returncode == 0, components.stderr
    assert "llm_assets.LLMPipelineComponent" in {item["key"] for item in json.loads(components.stdout)["items"]}

    folder = scaffold(project, "reviews")
    assert sorted(p.name for p in folder.iterdir()) == ["defs.yaml", "functions.py"]
    defs_yaml = folder / "defs.yaml"
    assert yaml.safe_load(defs_yaml.read_text())["type"] == "llm_assets.LLMPipelineComponent"
    # It names the bundled demo model and a landing folder it created with an example file: it
    # runs offline as scaffolded. The user adds a description and a file of their own.
    assert [p.name for p in (project / "data" / "reviews").iterdir()] == ["example.jsonl"]
    set_attributes(defs_yaml, description="The demo model answers each question.")
    (project / "data" / "reviews" / "example.jsonl").unlink()
    write_jsonl(project / "data" / "reviews" / "questions.jsonl", QUESTIONS)

    checked = run([str(BIN / "dg"), "check", "defs"], project)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully." in checked.stdout

    listed = run([str(BIN / "dg"), "list", "defs", "--json"], project)
    assert listed.returncode == 0, listed.stderr
    listing = json.loads(listed.stdout)
    assets = {asset["asset_key"] for asset in listing["assets"]}
    stages = ["preprocess", "chat_template", "tokenize", "engine", "detokenize", "postprocess"]
    assert {f"reviews/{stage}" for stage in stages} <= assets
    assert {"demo/postprocess", "sentences/postprocess"} <= assets  # the Python pipelines too
    jobs = {job["name"]: job.get("description") for job in listing["jobs"]}
    assert jobs["reviews_job"] == "The demo model answers each question."
    assert {"demo_job", "sentences_job"} <= set(jobs)
    assert {"reviews_new_files", "demo_new_files", "sentences_new_files"} <= {s["name"] for s in listing["sensors"]}
    assert {"storage", "ray_data", "engine_pool"} <= {r["name"] for r in listing["resources"]}

    added = run(
        [sys.executable, "-m", "llm_assets.cli", "add-partitions", "-f", "definitions.py", "--pipeline", "reviews"],
        project,
    )
    assert added.returncode == 0, added.stderr
    assert "reviews: 1 new partition(s) ['questions.jsonl']" in added.stdout

    executed = run(
        [
            str(BIN / "dagster"),
            "job",
            "execute",
            "-f",
            "definitions.py",
            "-j",
            "reviews_job",
            "--tags",
            json.dumps({"dagster/partition": "questions.jsonl"}),
        ],
        project,
        timeout=600,
    )
    log = executed.stdout + executed.stderr
    assert executed.returncode == 0, log[-4000:]
    assert "RUN_SUCCESS" in log

    rows = committed_rows(project, "reviews", "postprocess", "questions.jsonl")
    assert sorted(row["row_id"] for row in rows) == sorted(f"questions.jsonl:{i}" for i in range(len(QUESTIONS)))
    assert sorted(row["text"] for row in rows) == sorted(q["text"] for q in QUESTIONS)
    generated = committed_rows(project, "reviews", "detokenize", "questions.jsonl")
    assert all(isinstance(row["generated_text"], str) and row["num_generated_tokens"] > 0 for row in generated)
    answers = {row["row_id"]: row["answer"] for row in rows}
    assert answers == {row["row_id"]: row["generated_text"] for row in generated}


def line_of(path: Path, key: str) -> int:
    return next(
        number for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(f"{key}:")
    )


def test_a_bad_defs_yaml_fails_dg_check_naming_the_file_line_and_field(tmp_path):
    project = code_location_copy(tmp_path)
    defs_yaml = scaffold(project, "reviews") / "defs.yaml"
    set_attributes(defs_yaml, config={"batchsize": 64})

    checked = run([str(BIN / "dg"), "check", "defs"], project)
    assert checked.returncode == 1
    assert (
        f"{defs_yaml}:{line_of(defs_yaml, 'batchsize')}: attributes.config.batchsize: vLLMEngineProcessorConfig has "
        "no field 'batchsize' (did you mean 'batch_size'?)"
    ) in checked.stdout + checked.stderr


@pytest.fixture()
def load_components(monkeypatch):
    """Loads a project's YAML pipelines in this process, as definitions.py does (faster than a
    `dg check defs` per mistake); each project's `pipelines` package is imported afresh."""

    def forget_pipelines_modules() -> None:
        for name in [name for name in sys.modules if name == "pipelines" or name.startswith("pipelines.")]:
            del sys.modules[name]

    def load(project: Path) -> list:
        monkeypatch.syspath_prepend(str(project))
        forget_pipelines_modules()
        return dg.ComponentTree.for_project(project).get_all_components(of_type=LLMPipelineComponent)

    yield load
    forget_pipelines_modules()


def error_chain(exc: BaseException) -> str:
    messages = []
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(messages)


@pytest.mark.parametrize(
    ("attributes", "field", "problem"),
    [
        ({"processor": "vLLM"}, "processor", "Input should be 'vLLMEngineProcessorConfig', "),
        ({"max_error_rate": "lots"}, "max_error_rate", "Input should be a valid number"),
        (
            {"max_error_rate": 2},
            "max_error_rate",
            "pipeline 'reviews': max_error_rate is 2.0: expected a share between 0 and 1",
        ),
        ({"config": {"batch_size": "many"}}, "config.batch_size", "Input should be a valid integer"),
        (
            {"preprocess": ".functions.to_chat"},
            "preprocess",
            "cannot import 'pipelines.reviews.functions.to_chat': "
            "module 'pipelines.reviews.functions' has no 'to_chat'",
        ),
        (
            {"postprocess": "no_such_package.answers.fn"},
            "postprocess",
            "cannot import 'no_such_package.answers.fn': No module named",
        ),
        (
            {"source": {"bucket": "landing"}},
            "source",
            "give either folder (a local folder) or bucket (and prefix) for S3",
        ),
        (
            {"response_cache": "sometimes"},
            "response_cache",
            "pipeline 'reviews': response_cache is 'sometimes': expected one of deterministic, all, off",
        ),
    ],
)
def test_each_mistake_in_a_defs_yaml_names_its_line_and_field(tmp_path, load_components, attributes, field, problem):
    project = code_location_copy(tmp_path)
    folder = project / "pipelines" / "reviews"
    LLMPipelineScaffolder().scaffold(
        dg.ScaffoldRequest(
            type_name="llm_assets.LLMPipelineComponent",
            target_path=folder,
            scaffold_format="yaml",
            project_root=project,
            params=None,
        )
    )
    assert [component.pipeline.name for component in load_components(project)] == ["reviews"]  # as scaffolded: valid

    set_attributes(folder / "defs.yaml", **attributes)
    with pytest.raises(Exception) as raised:
        load_components(project)
    key = field.split(".")[-1]
    line = line_of(folder / "defs.yaml", key)
    assert f"{folder / 'defs.yaml'}:{line}: attributes.{field}: {problem}" in error_chain(raised.value)


def test_an_unknown_attribute_is_refused_by_dagsters_yaml_schema(tmp_path, load_components):
    project = code_location_copy(tmp_path)
    folder = project / "pipelines" / "reviews"
    LLMPipelineScaffolder().scaffold(
        dg.ScaffoldRequest(
            type_name="llm_assets.LLMPipelineComponent",
            target_path=folder,
            scaffold_format="yaml",
            project_root=project,
            params=None,
        )
    )
    set_attributes(folder / "defs.yaml", sensor_intervall_s=5)
    with pytest.raises(Exception) as raised:
        load_components(project)
    line = line_of(folder / "defs.yaml", "sensor_intervall_s")
    message = error_chain(raised.value)
    assert f"attributes.sensor_intervall_s at {folder / 'defs.yaml'}:{line}" in message
    assert "Extra inputs are not permitted" in message
