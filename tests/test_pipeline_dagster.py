"""Whole pipelines through real Dagster runs: local Ray, the real CPU vLLM engine, Parquet outputs."""

import ast
import json
import os

import dagster as dg
import pytest

from llm_assets.defs.assets import metadata
from llm_assets.defs.factory import build_definitions, stage_key
from llm_assets.execution.stats import PartitionStats
from llm_assets.sources import LocalFolderSource
from tests.helpers.data import questions, write_jsonl
from tests.helpers.models import model_without_chat_template
from tests.helpers.pipelines import (
    MAX_TOKENS,
    OPERATOR_TIMES,
    RANGE_END,
    RANGE_START,
    assert_failed_before_any_engine,
    engine_starts,
    log_messages,
    make_pipeline,
    make_resources,
    read_output,
    run_job,
    to_answer,
    to_chat,
)


def answer_and_niceness(row):
    return {**to_answer(row), "worker_nice": os.nice(0)}


@pytest.fixture(scope="module")
def two_partition_run(tmp_path_factory, tiny_model, ray_session):
    """One run over two partitions (a single-run backfill): every stage, one engine start."""
    root = tmp_path_factory.mktemp("pipeline")
    write_jsonl(root / "landing" / "a.jsonl", questions(5, "a"))
    write_jsonl(root / "landing" / "b.jsonl", questions(7, "b"))
    pipeline = make_pipeline(root / "landing", tiny_model, postprocess=answer_and_niceness)
    resources = make_resources(root / "storage")
    with dg.instance_for_test() as instance:
        result = run_job(pipeline, resources, instance, {RANGE_START: "a.jsonl", RANGE_END: "b.jsonl"})
        yield {"root": root, "instance": instance, "result": result, "resources": resources, "model": tiny_model}


def test_one_run_over_two_partitions_starts_the_engine_once(two_partition_run):
    result, instance = two_partition_run["result"], two_partition_run["instance"]
    assert result.success
    assert engine_starts(instance, result.run_id) == 1
    storage = two_partition_run["resources"]["storage"].store()
    assert (
        storage.manifest("tiny", "engine", "a.jsonl").rows == 5
        and storage.manifest("tiny", "engine", "b.jsonl").rows == 7
    )


def test_every_row_id_reaches_the_output_exactly_once(two_partition_run):
    storage = two_partition_run["resources"]["storage"].store()
    for partition, n in (("a.jsonl", 5), ("b.jsonl", 7)):
        rows = read_output(storage, "postprocess", partition)
        assert sorted(r["row_id"] for r in rows) == sorted(f"{partition}:{i}" for i in range(n))
        assert all(r["tokens"] == MAX_TOKENS and isinstance(r["answer"], str) for r in rows)
        # The CPU stages ran at a lower priority than the engines (niceness 0, test_engine_actors.py).
        assert all(r["worker_nice"] > 0 for r in rows)
        prompts = read_output(storage, "chat_template", partition)
        assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in prompts)


def test_each_stage_records_metadata_per_partition(two_partition_run):
    instance = two_partition_run["instance"]
    for stage in ("preprocess", "chat_template", "tokenize", "engine", "detokenize", "postprocess"):
        assert instance.get_materialized_partitions(dg.AssetKey(["tiny", stage])) == {"a.jsonl", "b.jsonl"}, stage
    engine = instance.get_latest_materialization_event(dg.AssetKey(["tiny", "engine"])).asset_materialization
    metadata = {k: v.value for k, v in engine.metadata.items()}
    assert metadata["rows_in"] == metadata["rows_out"] == 12
    assert metadata["generated_tokens"] == 12 * MAX_TOKENS
    assert metadata["input_tokens"] > 0 and metadata["generated_tokens_per_s"] > 0
    # Dagster's standard keys, as the UI reads them.
    assert metadata["dagster/row_count"] == 12
    columns = {column.name: column.type for column in metadata["dagster/column_schema"].columns}
    assert columns["generated_tokens"] == "list<item: int32>" and "row_id" in columns
    assert metadata["dagster/uri"].endswith("/tiny/engine")  # two partitions: the stage's folder
    # The engine held by the run from its actor's creation to its release; on the CPU, no GPU.
    assert metadata["engine_seconds"] > 0 and metadata["gpu_seconds"] == 0
    [placement] = metadata["engine_placement"]
    assert placement["engine"] == 0 and placement["host"] and placement["node_id"] and placement["gpu_ids"] == []
    assert "engine_seconds" not in {k for k in detokenize_metadata(instance)}
    detokenize = instance.get_latest_materialization_event(dg.AssetKey(["tiny", "detokenize"])).asset_materialization
    sample = detokenize.metadata["sample"].value
    assert sample.startswith("| prompt | generated_text |") and "number" in sample and len(sample.splitlines()) == 2 + 5


def detokenize_metadata(instance) -> dict:
    return instance.get_latest_materialization_event(dg.AssetKey(["tiny", "detokenize"])).asset_materialization.metadata


def test_the_run_is_a_ray_data_dataset_whose_operators_report_their_tasks(two_partition_run):
    """The run's stages are Ray Data operators: Ray's own state lists the run's dataset with them
    (what Ray's dashboard shows), and once they are done the run logs one line per operator from
    Ray Data's stats: its tasks (one file each at least: two partitions) and how long each ran, and
    on CPU."""
    import ray
    from ray.data._internal.stats import get_or_create_stats_actor

    instance, result = two_partition_run["instance"], two_partition_run["result"]
    found = {m.group(1): m for m in map(OPERATOR_TIMES.search, log_messages(instance, result.run_id)) if m}
    groups = ["MapBatches(preprocess+chat_template+tokenize)", "MapBatches(engine_output+detokenize+postprocess)"]
    # The engine's input in blocks of at most four batches (batch_size 4).
    rebatch = "StreamingRepartition[num_rows_per_block=16,strict=False]"
    assert set(found) == {"ReadReads", *groups, rebatch, "MapBatches(EngineStage)"}
    for name in [*groups, "MapBatches(EngineStage)"]:
        tasks, ran, longest, on_cpu = (float(found[name].group(i)) for i in (2, 3, 4, 5))
        assert tasks >= 2 and 0 < ran <= longest + 0.05 and on_cpu <= ran + 0.05, found[name].group(0)
    assert int(found["MapBatches(EngineStage)"].group(6)) == 12
    datasets = ray.get(get_or_create_stats_actor().get_datasets.remote())
    operators = {op["name"]: op for dataset in datasets.values() for op in dataset["operators"].values()}
    assert operators["MapBatches(EngineStage)"]["state"] == "FINISHED"
    assert operators["MapBatches(preprocess+chat_template+tokenize)"]["total_rows"] >= 12


def test_the_engine_reports_where_its_loop_spent_its_time_when_it_shuts_down(two_partition_run):
    """The engine's shutdown line: its loop's steps and seconds stepping, admitting, handing back
    and idle, and the window from its first request to its last output that the steps fall in."""
    instance, result = two_partition_run["instance"], two_partition_run["result"]
    messages = log_messages(instance, result.run_id)
    lines = [m for m in messages if m.startswith("vLLM engine 0 shut down: ")]
    assert len(lines) == 1, "\n".join(m for m in messages if "engine" in m)
    line = lines[0]
    report = ast.literal_eval(line.split(": ", 1)[1])
    assert report["steps"] >= MAX_TOKENS  # one token per sequence a step, at most
    assert 0 < report["stepping_s"] <= report["working_s"], report
    assert min(report["admitting_s"], report["handing_back_s"], report["idle_s"]) >= 0


def test_gpu_time_is_priced_where_a_price_is_set():
    results = [PartitionStats("a.jsonl", rows_out=3, seconds=2.0)]
    usage = {"engine_seconds": 5400.0, "gpu_seconds": 7200.0, "engine_starts": 1, "placement": []}
    assert "estimated_cost" not in metadata(results, usage)
    priced = metadata(results, usage, price_per_gpu_hour=2.5)
    assert priced["gpu_seconds"] == 7200.0 and priced["estimated_cost"] == 5.0


def test_rerunning_postprocess_reads_persisted_output_and_never_starts_an_engine(two_partition_run):
    root, instance, resources = two_partition_run["root"], two_partition_run["instance"], two_partition_run["resources"]
    storage = resources["storage"].store()
    engine_before = storage.manifest("tiny", "engine", "a.jsonl")

    def shout(row):
        return {"question": row["question"], "answer": row["generated_text"].upper()}

    pipeline = make_pipeline(root / "landing", two_partition_run["model"], postprocess=shout)
    job = build_definitions([pipeline], resources).resolve_job_def("tiny_job")
    result = job.execute_in_process(
        instance=instance, partition_key="a.jsonl", asset_selection=[stage_key(pipeline, "postprocess")]
    )
    assert result.success
    messages = log_messages(instance, result.run_id)
    assert not any("vLLM engine" in m for m in messages)
    rows = read_output(storage, "postprocess", "a.jsonl")
    detokenized = {r["row_id"]: r["generated_text"] for r in read_output(storage, "detokenize", "a.jsonl")}
    assert {r["row_id"]: r["answer"] for r in rows} == {k: v.upper() for k, v in detokenized.items()}
    assert storage.manifest("tiny", "engine", "a.jsonl") == engine_before


@pytest.mark.parametrize(
    "landing, pipeline_kwargs, expected",
    [
        (
            {"x.jsonl": [{"question": "hi"}]},
            {"preprocess": None},
            "row 'x.jsonl:0': has neither 'messages' nor 'prompt'",
        ),
        ({"x.jsonl": []}, {}, "x.jsonl has no rows"),
        ({"x.jsonl": [{"q": "hi"}]}, {}, "row 'x.jsonl:0': the preprocess function raised KeyError: 'question'"),
        (
            {"x.jsonl": [{"question": "hi"}]},
            {"preprocess": lambda row: {"messages": row["question"]}},
            "'messages' is str: expected a non-empty list",
        ),
        (
            {"x.jsonl": [{"question": "hi"}]},
            {"model_source": "models/SmolLM2-135M"},  # a relative path with a typo looks like a hub id
            "model_source 'models/SmolLM2-135M' is no local path, and as a Hugging Face repo id "
            "it is not in the local cache",
        ),
        (
            {"x.jsonl": [{"question": "hi"}]},
            {"preprocess": lambda row: {"prompt": row["question"], "sampling_params": {"max_tokens": 0}}},
            "max_tokens is 0: expected an integer >= 1",
        ),
        (
            {"x.jsonl": [{"question": "hi"}]},
            {"preprocess": lambda row: {"prompt": row["question"], "sampling_params": {"logprobs": "5"}}},
            "row 'x.jsonl:0': sampling_params.logprobs is '5': expected an integer >= 0",
        ),
        (
            {"x.jsonl": [{"question": "hi"}]},
            {"preprocess": lambda row: {"prompt": row["question"], "tokenization_kwargs": {"padding": True}}},
            "row 'x.jsonl:0': tokenization_kwargs.padding is not supported",
        ),
    ],
)
def test_bad_input_fails_the_run_with_a_clear_message_before_any_engine_starts(
    tmp_path, tiny_model, ray_session, instance, landing, pipeline_kwargs, expected
):
    for name, rows in landing.items():
        write_jsonl(tmp_path / "landing" / name, rows)
    model = pipeline_kwargs.pop("model_source", tiny_model)
    pipeline = make_pipeline(tmp_path / "landing", model, **pipeline_kwargs)
    result = run_job(
        pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "x.jsonl"}, raise_on_error=False
    )
    assert_failed_before_any_engine(result, instance, tmp_path / "storage", expected)


@pytest.mark.parametrize("case", ["corrupt parquet", "jsonl with a bad line", "model without a chat template"])
def test_a_bad_file_or_model_fails_the_run_before_any_engine_starts(tmp_path, tiny_model, ray_session, instance, case):
    landing = tmp_path / "landing"
    if case == "corrupt parquet":
        partition, model, expected = "x.parquet", tiny_model, "x.parquet: not a readable Parquet file"
        landing.mkdir()
        (landing / partition).write_bytes(b"PAR1 not really parquet")
    elif case == "jsonl with a bad line":
        partition, model, expected = "x.jsonl", tiny_model, "x.jsonl: line 2 (row 'x.jsonl:1'): invalid JSON"
        landing.mkdir()
        (landing / partition).write_text('{"question": "fine"}\n{"question": oops}\n')
    else:
        partition, model = "x.jsonl", model_without_chat_template(tiny_model, tmp_path / "m")
        expected = "has no chat template; pass chat_template_stage={'chat_template': '...'}"
        write_jsonl(landing / partition, [{"question": "hi"}])
    pipeline = make_pipeline(landing, model)
    pipeline.source = LocalFolderSource(str(landing), pattern="x.*")
    result = run_job(
        pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": partition}, raise_on_error=False
    )
    assert_failed_before_any_engine(result, instance, tmp_path / "storage", expected)
    if case == "model without a chat template":  # nothing after Preprocess is committed
        committed = {p.parent.parent.name for p in (tmp_path / "storage" / "tiny").rglob("_manifest.json")}
        assert committed <= {"preprocess"}


def test_the_run_fails_naming_the_row_when_a_request_fails(tmp_path, tiny_model, ray_session, instance):
    write_jsonl(tmp_path / "landing" / "x.jsonl", [{"question": "fine"}, {"question": "odd"}])

    def odd_params(row):  # top_p 5 passes Preprocess's checks; vLLM refuses it
        chat = to_chat(row)
        if row["question"] == "odd":
            chat["sampling_params"] = {**chat["sampling_params"], "top_p": 5}
        return chat

    pipeline = make_pipeline(tmp_path / "landing", tiny_model, preprocess=odd_params)
    result = run_job(
        pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "x.jsonl"}, raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "tiny_stages"
    error = failure.step_failure_data.error
    headline = (error.cause or error).message.splitlines()[0]  # what the UI shows first
    assert "RowError: engine: row 'x.jsonl:1'" in headline and "top_p" in headline, headline
    assert (
        json.loads((tmp_path / "storage" / "tiny" / "tokenize" / "x.jsonl" / "_manifest.json").read_text())["rows"] == 2
    )


def test_a_prompt_longer_than_the_context_fails_before_the_engine_takes_a_row(
    tmp_path, tiny_model, ray_session, instance
):
    write_jsonl(tmp_path / "landing" / "x.jsonl", [{"question": "fine"}, {"question": "word " * 600}])
    pipeline = make_pipeline(tmp_path / "landing", tiny_model)  # max_model_len 512
    result = run_job(
        pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "x.jsonl"}, raise_on_error=False
    )
    assert_failed_before_any_engine(
        result,
        instance,
        tmp_path / "storage",
        "RowError: tokenize: row 'x.jsonl:1': the prompt has",
        engine_may_build=True,
    )
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "this model's maximum context length is 512 tokens" in failure.step_failure_data.error.to_string()
    # What committed before the failure is reported as materialized.
    assert instance.get_materialized_partitions(dg.AssetKey(["tiny", "preprocess"])) == {"x.jsonl"}
    assert not instance.get_materialized_partitions(dg.AssetKey(["tiny", "tokenize"]))
