"""The tiny test pipeline and how tests run it through Dagster: on the real vLLM CPU engine
(``make_pipeline``, for what an engine computes) or on the fake engine (``fake_pipeline``, for
orchestration: sensors, partitions, commits, resume, restarts)."""

from __future__ import annotations

import re

import dagster as dg
import pyarrow.parquet as pq

from llm_assets.defs.factory import add_partitions_for_new_files, build_definitions, stage_key
from llm_assets.engines.fake import FakeEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.resources import PartitionStorage
from llm_assets.resources import make_resources as build_resources
from llm_assets.sources import LocalFolderSource

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
MAX_TOKENS = 8


def to_chat(row):
    return {
        "question": row["question"],
        "messages": [{"role": "user", "content": row["question"]}],
        "sampling_params": {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0},
    }


def to_answer(row):
    return {"question": row["question"], "answer": row["generated_text"], "tokens": row["num_generated_tokens"]}


def make_pipeline(folder, model, postprocess=to_answer, preprocess=to_chat, **config) -> LLMPipeline:
    """The tiny pipeline on vLLM (``model``: the tiny real model)."""
    settings = {"model_source": model, "engine_kwargs": {"max_model_len": 512}, "batch_size": 4}
    settings.update(config)
    return LLMPipeline("tiny", settings, LocalFolderSource(str(folder)), preprocess=preprocess, postprocess=postprocess)


def fake_pipeline(folder, model, postprocess=to_answer, preprocess=to_chat, **config) -> LLMPipeline:
    """The same pipeline on the fake engine (``model``: a folder with a tokenizer, ``fake_model``)."""
    settings = {"model_source": model, "engine_kwargs": {"max_model_len": 512}, "batch_size": 4}
    settings.update(config)
    return LLMPipeline(
        "tiny",
        FakeEngineProcessorConfig(**settings),
        LocalFolderSource(str(folder)),
        preprocess=preprocess,
        postprocess=postprocess,
    )


def sensed(pipeline: LLMPipeline, interval_s: int) -> LLMPipeline:
    """The pipeline with its new-files sensor running by default, ticking every ``interval_s``."""
    pipeline.sensor_running_by_default, pipeline.sensor_interval_s = True, interval_s
    return pipeline


def make_resources(storage_root, **engine_pool_settings) -> dict:
    return build_resources(PartitionStorage(root=str(storage_root)), **engine_pool_settings)


def run_job(pipeline, resources, instance, tags, raise_on_error=True, stages=None):
    """One run of the pipeline's job (``stages``: only those stage assets)."""
    add_partitions_for_new_files(instance, pipeline)
    job = build_definitions([pipeline], resources).resolve_job_def(f"{pipeline.name}_job")
    selection = [stage_key(pipeline, stage) for stage in stages] if stages else None
    return job.execute_in_process(
        instance=instance, tags=tags, raise_on_error=raise_on_error, asset_selection=selection
    )


def log_messages(instance, run_id) -> list[str]:
    return [event.user_message for event in instance.all_logs(run_id)]


def read_output(storage, stage, partition, pipeline: str = "tiny") -> list[dict]:
    return pq.read_table(storage.committed_files(pipeline, stage, partition)).to_pylist()


# The line a run logs per Ray Data operator once its execution is done.
OPERATOR_TIMES = re.compile(
    r"tiny: Ray Data (.+?): (\d+) task\(s\); per task on average \(longest\): ran ([\d.]+) s \(([\d.]+) s\), "
    r"([\d.]+) s of it on CPU; (\d+) rows out"
)


def assert_failed_before_any_engine(
    result, instance, storage_root, expected: str, engine_may_build: bool = False
) -> None:
    """The run failed with ``expected`` in its step failure, and no engine started (or, where the
    error can only be found after Preprocess, when the engine build begins: no engine took a row)."""
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.step_failure_data.error
    headline = (error.cause or error).message.splitlines()[0]  # what the UI shows first
    assert expected in headline, headline
    if not engine_may_build:
        messages = log_messages(instance, result.run_id)
        assert not any("engine actor(s) (" in m or "vLLM engine 0 started" in m for m in messages)
    assert not (storage_root / "tiny" / "engine").exists()  # no engine output, not even an attempt folder


def step_failure(result):
    """The failed step's error, and the first line the UI shows of it."""
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.step_failure_data.error
    return error, (error.cause or error).message.splitlines()[0]


def engine_materialization(instance, run_id, stage: str = "engine") -> dict:
    """The stage's materialization metadata in the run, as plain values."""
    for event in instance.all_logs(run_id):
        materialization = event.asset_materialization
        if materialization is not None and materialization.asset_key.path[-1] == stage:
            return {key: value.value for key, value in materialization.metadata.items()}
    raise AssertionError(f"the run materialized no {stage} stage")


SENSOR = "tiny_new_files"


def tick(defs: dg.Definitions, instance) -> dg.SensorResult | dg.SkipReason:
    """One sensor tick, applied as the daemon applies it (observations recorded, partitions added, runs returned)."""
    # With an instance ref, as the daemon builds it: run requests may then name the partitions
    # that the same tick adds.
    context = dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(), definitions=defs)
    data = defs.get_sensor_def(SENSOR).evaluate_tick(context)
    for event in data.asset_events:  # the landing files' data versions
        instance.report_runless_asset_event(event)
    for request in data.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return data


def engine_starts(instance, run_id) -> int:
    """How many engines the run built, from its engine stage's metadata (0 without one)."""
    return engine_materialization(instance, run_id).get("engine_starts", 0)
