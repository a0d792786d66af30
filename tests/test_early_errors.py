"""Mistakes a user makes are named early, as the first thing they read: a bad input file before
any stage runs (Ray starts only once a file has passed), a local model path that does not exist
when definitions load (with the YAML file and line for a YAML pipeline), a landing folder that
does not exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from llm_assets.defs.factory import build_definitions
from llm_assets.pipeline import ModelPathError
from llm_assets.storage import NotMaterializedError
from tests.helpers.deployment import code_location_env
from tests.helpers.pipelines import RANGE_END, RANGE_START, make_pipeline, make_resources, read_output
from tests.helpers.project import code_location_copy, run, scaffold, set_attributes

BIN = Path(sys.executable).parent
DEFINITIONS = textwrap.dedent(
    """\
    import os

    from llm_assets.defs.factory import build_definitions
    from llm_assets.resources import PartitionStorage, make_resources
    from tests.helpers.pipelines import make_pipeline

    PIPELINES = [make_pipeline(os.environ["EARLY_LANDING"], os.environ["EARLY_MODEL"])]
    defs = build_definitions(PIPELINES, make_resources(PartitionStorage(root=os.environ["EARLY_STORAGE"])))
    """
)


def test_a_bad_input_file_is_named_seconds_after_the_command_starts_and_no_ray_starts(tmp_path, tiny_model):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "x.jsonl").write_text(json.dumps({"question": "fine"}) + "\n{not json\n")
    (tmp_path / "defs.py").write_text(DEFINITIONS)
    (tmp_path / "home").mkdir()
    env = {**os.environ, **code_location_env(tmp_path / "home", "EARLY", landing, tmp_path / "storage", tiny_model)}
    subprocess.run(
        [sys.executable, "-m", "llm_assets.cli", "add-partitions", "-f", "defs.py"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    started = time.monotonic()
    command = subprocess.Popen(
        [
            str(BIN / "dagster"),
            "job",
            "execute",
            "-f",
            "defs.py",
            "-j",
            "tiny_job",
            "--tags",
            json.dumps({"dagster/partition": "x.jsonl"}),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    cause_at = None
    for line in command.stdout:
        lines.append(line)
        if cause_at is None and "x.jsonl: line 2 (row 'x.jsonl:1'): invalid JSON" in line:
            cause_at = time.monotonic() - started
    assert command.wait(timeout=120) == 1
    output = "".join(lines)
    assert cause_at is not None, output[-3000:]
    assert cause_at <= 5.0, f"the cause came {cause_at:.1f} s after the command started"
    assert "Started a local Ray" not in output and "engine actor" not in output, output[-3000:]


def test_a_local_model_path_that_does_not_exist_fails_when_definitions_load(tmp_path):
    (tmp_path / "landing").mkdir()
    pipeline = make_pipeline(tmp_path / "landing", "/no/such/model")
    with pytest.raises(
        ModelPathError, match=r"^pipeline 'tiny': model_source '/no/such/model' does not exist \(relative paths"
    ):
        build_definitions([pipeline], make_resources(tmp_path / "storage"))
    # A stage's own model too; a hub id or an S3 URI is the run's to check.
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    pipeline = make_pipeline(tmp_path / "landing", "org/some-model", tokenize_stage={"model_source": str(folder)})
    with pytest.raises(
        ModelPathError, match=r"tokenize_stage.model_source '.*not-a-model' is a folder without config.json"
    ):
        build_definitions([pipeline], make_resources(tmp_path / "storage"))
    build_definitions([make_pipeline(tmp_path / "landing", "org/some-model")], make_resources(tmp_path / "storage"))


def test_a_yaml_mistake_is_the_first_line_with_its_file_line_and_the_caret_at_the_value(tmp_path):
    project = code_location_copy(tmp_path)
    defs_yaml = scaffold(project, "reviews") / "defs.yaml"
    text = defs_yaml.read_text().replace(
        'model_source: "{{ demo_model }}"', "model_source: ./models/mine    # my model, a comment"
    )
    defs_yaml.write_text(text)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "model_source: ./models/mine" in row)
    located = (
        f"{defs_yaml}:{line}: attributes.config.model_source: model_source './models/mine' does not exist "
        f"(relative paths start from {project})"
    )

    added = run([sys.executable, "-m", "llm_assets.cli", "add-partitions", "-f", "definitions.py"], project)
    assert added.returncode == 2
    assert added.stderr.startswith(located), added.stderr
    # The caret stands under the value, not in the comment after it.
    source_line, caret_line = next(
        (a, b)
        for a, b in zip(added.stderr.splitlines(), added.stderr.splitlines()[1:])
        if "model_source: ./models/mine" in a
    )
    assert caret_line.index("^") == source_line.index("./models/mine"), f"{source_line}\n{caret_line}"

    checked = run([str(BIN / "dg"), "check", "defs"], project)
    assert checked.returncode == 1
    output = checked.stdout + checked.stderr
    # dg's own YAML schema check passes first; the load error it then prints starts with the located line.
    error = output[output.index("Validation failed for code location") :]
    assert error.splitlines()[2].startswith(f"llm_assets.defs.component.PipelineYamlError: {located}"), error[:2000]


def test_a_landing_folder_that_does_not_exist_is_named_by_the_cli_and_the_sensor(tmp_path):
    project = code_location_copy(tmp_path)
    defs_yaml = scaffold(project, "reviews") / "defs.yaml"
    set_attributes(defs_yaml, source={"folder": str(tmp_path / "typo"), "pattern": "*.jsonl"})
    added = run(
        [sys.executable, "-m", "llm_assets.cli", "add-partitions", "-f", "definitions.py", "--pipeline", "reviews"],
        project,
    )
    assert added.returncode == 0
    assert (
        f"warning: reviews: the landing folder {tmp_path / 'typo'} does not exist: "
        "create it, or fix the pipeline's source" in added.stderr
    )
    assert "reviews: 0 new partition(s)" in added.stdout

    pipeline = make_pipeline(tmp_path / "typo", "org/some-model")
    defs = build_definitions([pipeline], make_resources(tmp_path / "storage"))
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, definitions=defs)
        result = defs.get_sensor_def("tiny_new_files").evaluate_tick(context)
    assert result.skip_message.startswith(f"the landing folder {tmp_path / 'typo'} does not exist"), result.skip_message


RAY_IN_PREPROCESS = textwrap.dedent(
    """\
    import sys

    import ray

    from llm_assets.execution.preflight import check_sources
    from tests.helpers.pipelines import make_pipeline

    def ask_with_node(row):
        node = ray.get_runtime_context().get_node_id()
        return {"node": node, "messages": [{"role": "user", "content": row["question"]}]}

    pipeline = make_pipeline(sys.argv[1], sys.argv[2], preprocess=ask_with_node)
    found = check_sources(pipeline, ["x.jsonl", "y.jsonl"], None)
    print(sorted(found.rows.items()), sorted(found.problems.items()), ray.is_initialized())
    """
)


def test_a_preprocess_function_that_calls_ray_is_not_run_before_ray_starts_and_starts_no_ray(tmp_path, tiny_model):
    # Ray's automatic init from a checking thread would start a Ray whose GCS dies with that
    # thread, ending the run a minute later ("Failed to connect to GCS within 60 seconds").
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "x.jsonl").write_text(json.dumps({"question": "fine"}) + "\n")
    (landing / "y.jsonl").write_text("")
    script = tmp_path / "check.py"
    script.write_text(RAY_IN_PREPROCESS)
    done = subprocess.run(
        [sys.executable, str(script), str(landing), tiny_model],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    empty = f"{landing}/y.jsonl has no rows: an input file needs at least one row"
    assert done.stdout.strip() == f"[('x.jsonl', 1), ('y.jsonl', 0)] [('y.jsonl', '{empty}')] False"


RAY_NODE_DEFINITIONS = textwrap.dedent(
    """\
    import os

    import ray

    from llm_assets.defs.factory import build_definitions
    from llm_assets.resources import PartitionStorage, make_resources
    from tests.helpers.pipelines import fake_pipeline, to_chat

    def ask_with_node(row):  # asks Ray: in the input check only once Ray is up, in every worker
        return {**to_chat(row), "node": ray.get_runtime_context().get_node_id()}

    def answer_with_node(row):
        return {"question": row["question"], "node": row["node"], "answer": row["generated_text"]}

    PIPELINES = [
        fake_pipeline(os.environ["EARLY_LANDING"], os.environ["EARLY_MODEL"], answer_with_node, ask_with_node)
    ]
    defs = build_definitions(PIPELINES, make_resources(PartitionStorage(root=os.environ["EARLY_STORAGE"])))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("files,rows", [(3, 20), (12, 400)])
def test_ray_starts_beside_the_input_check_and_a_preprocess_that_asks_ray_runs_everywhere(
    files, rows, tmp_path, fake_model
):
    # Ray starts in the run's thread once one file has passed, while the check reads the rest and
    # runs Preprocess (here asking Ray for its node) on their first rows; one bad file among them.
    landing = tmp_path / "landing"
    landing.mkdir()
    for number in range(files):
        lines = [json.dumps({"question": f"q{number}-{row}"}) for row in range(rows)]
        (landing / f"part-{number:03}.jsonl").write_text("\n".join(lines) + "\n")
    (landing / "part-bad.jsonl").write_text(json.dumps({"question": "fine"}) + "\n{not json\n")
    (tmp_path / "defs.py").write_text(RAY_NODE_DEFINITIONS)
    (tmp_path / "home").mkdir()
    env = {**os.environ, **code_location_env(tmp_path / "home", "EARLY", landing, tmp_path / "storage", fake_model)}
    command = [sys.executable, "-m", "llm_assets.cli", "add-partitions", "-f", "defs.py"]
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    keys = sorted(p.name for p in landing.iterdir())
    tags = {RANGE_START: keys[0], RANGE_END: keys[-1]}
    done = subprocess.run(
        [str(BIN / "dagster"), "job", "execute", "-f", "defs.py", "-j", "tiny_job", "--tags", json.dumps(tags)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "part-bad.jsonl: line 2 (row 'part-bad.jsonl:1'): invalid JSON" in output, output[-3000:]
    assert output.count("Started a local Ray for this run") == 1, output[-3000:]
    storage = make_resources(tmp_path / "storage")["storage"].store()
    nodes = set()
    for number in range(files):
        rows_out = read_output(storage, "postprocess", f"part-{number:03}.jsonl")
        assert sorted(r["question"] for r in rows_out) == sorted(f"q{number}-{row}" for row in range(rows))
        nodes.update(r["node"] for r in rows_out)
    assert len(nodes) == 1 and len(nodes.pop()) == 56  # the local Ray's one node id
    with pytest.raises(NotMaterializedError):
        storage.committed_files("tiny", "preprocess", "part-bad.jsonl")
