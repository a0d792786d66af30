"""Parity with ray.data.llm 2.60: what Ray's own CPU tests of processor configs and stages check
(python/ray/llm/tests/batch/cpu/ in ray-project/ray), checked here against llm_assets' configs and
stage UDFs. Each test names the Ray test it mirrors. No engine, no Ray: configs and stages are plain
Python, the stages run on pyarrow tables with the tiny test Llama's real tokenizer and chat template
(conftest's ``fake_model``: ``tiny_model`` without weights). Ray's tests mock the tokenizer; the
outputs here are the ones a user sees.

Deliberate differences from Ray 2.60, asserted as llm_assets' behaviour:

- Tokenize: a prompt the chat template wrote is tokenized without adding special tokens (the
  template already wrote the BOS... as text, and vLLM's own chat path does the same); Ray 2.60 lets
  the tokenizer add them again. A raw ``prompt`` row gets them, as in Ray.
- Stage ``concurrency`` left unset is not the processor's: CPU stages are not tied to the engine
  count (llm_assets runs as many as the cluster's CPUs); Ray 2.60 copies the processor's.
- The engine pool is fixed: ``concurrency=n`` means n engines and ``(m, n)`` means n; Ray 2.60 builds
  an autoscaling actor pool of 1..n (or m..n).
- ``log_engine_metrics`` is off by default (Ray 2.60: on): keeping the stats costs the step loop time.
- ``engine_kwargs`` stay as given; Ray 2.60 writes ``task_type`` into them.
- ``max_tasks_in_flight_per_actor`` < 1 is refused when the config is built; Ray 2.60 accepts any int
  (and logs a warning when it is below ``max_concurrent_batches``; llm_assets does not warn).
- Postprocess's output row also keeps ``row_id`` (llm_assets' stable row id, for resuming runs).
- ``PrepareMultimodalStageConfig`` has a ``model_source`` field, inherited from the processor like the
  other stages'; Ray 2.60's has none (the stage always parses with the processor's model, which is
  also what llm_assets does unless the field is set).

Not ported, and why:

- test_processor_base::test_empty_processor, test_processor_with_no_preprocess_or_postprocess,
  test_processor_with_stages -> run a Processor on ray.data.range (needs Ray Data); their row-level
  behaviour (preprocess merges into the input row, postprocess keeps only what the function returns,
  identity without functions) is ported below on the stage UDFs.
- test_processor_base::test_builder -> ProcessorBuilder.register / override_stage_config_fn: no such
  builder or override hook here (engines are registered per config class; ported: an unregistered
  config class is refused).
- test_stage_base::TestStatefulStageUDF (basic_processing, missing_data_column, missing_required_key,
  missing_idx_in_batch_column), test_stateful_stage -> Ray's ``__data`` / ``__idx_in_batch`` row
  wrapper; llm_assets' stages take pyarrow tables whose other columns pass through untouched, and
  rows are checked once, in Preprocess (tests/test_stages.py).
- test_prepare_multimodal_stage (image_url, multiple_image_urls, pil_image, no_multimodal_content,
  expected_keys) -> need Qwen/Qwen2.5-VL-3B-Instruct from the model hub and an image on the internet;
  covered offline by tests/test_multimodal.py (slow tier, a tiny Idefics3 and local media).
- test_multimodal_proc::test_multi_modal_processor -> MultimodalProcessorConfig and build_llm_processor
  are not in Ray 2.60, and the test needs a hub model.
- test_prepare_image_stage, test_prepare_video_stage, test_video_processor -> stages not in Ray 2.60
  (replaced by PrepareMultimodalStage) and need media from the internet.
- test_http_request_stage -> Ray's HTTP stage UDF against mocked aiohttp sessions; llm_assets' HTTP
  engine replica is tested against a local server in tests/test_http_engine.py.
- test_backward_compat -> the legacy flags (apply_chat_template, tokenize, detokenize, has_image) are
  gone in Ray 2.60; ported as: they are refused, naming the field.
- test_lazy_imports::test_http_request_stage_only_loads_its_own_submodule, test_stage_lazy_attr_resolves,
  test_processor_lazy_attr_resolves -> Ray's lazy re-exports of its stage and processor modules;
  llm_assets' stage package imports its small stage modules at once (none imports an engine, which
  the ported import test checks).
- test_processor_no_blocking -> Ray Data's DataContext.wait_for_min_actors_s and ActorPoolStrategy
  (needs Ray Data); the concurrency mapping is ported as the fixed engine pool above.
- accelerators/test_gpu_batch_scheduling, accelerators/test_tpu_batch_scheduling -> Ray's accelerator
  scheduling module is not in 2.60, and needs GPU / TPU placement groups.
- gpu/processor/test_vllm_engine_proc (generation, embedding, vision runs) -> need a GPU and hub
  models; its config checks (stage list, engine settings, placement_group_config) are ported.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
from pydantic import ValidationError

import llm_assets
from llm_assets import HttpRequestProcessorConfig, ProcessorConfig, vLLMEngineProcessorConfig
from llm_assets.config import (
    ChatTemplateStageConfig,
    DetokenizeStageConfig,
    PrepareMultimodalStageConfig,
    TokenizerStageConfig,
)
from llm_assets.engines import engine_for
from llm_assets.pipeline import LLMPipeline
from llm_assets.rows import ERROR_COLUMN, table_of
from llm_assets.sources import LocalFolderSource
from llm_assets.stages.chat_template import ChatTemplateStage
from llm_assets.stages.detokenize import DetokenizeStage
from llm_assets.stages.postprocess import PostprocessStage
from llm_assets.stages.tokenize import TokenizeStage
from llm_assets.stages.tokenizer import load_tokenizer
from tests.helpers.stages import preprocess_stage


def pipeline_of(config) -> LLMPipeline:
    return LLMPipeline("parity", config, LocalFolderSource("/nowhere"))


def stage_from_plan(pipeline: LLMPipeline, name: str, model: str):
    """The stage as the run builds it: its UDF class, the kwargs the plan gives it, the model."""
    plan = pipeline.plan(name)
    return plan.udf(model, **plan.udf_kwargs)


class Exploding:
    """A tokenizer that fails the test if a stage calls it."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("the stage called the tokenizer for rows it should have left alone")

    decode = apply_chat_template = __call__


# --- processor configs (test_processor_base, processor/base.py's validators) ------------------


def test_processor_config_defaults():
    """Mirrors the ProcessorConfig / OfflineProcessorConfig field defaults Ray's tests build on."""
    base = ProcessorConfig()
    assert (base.batch_size, base.accelerator_type, base.concurrency) == (32, None, 1)
    config = vLLMEngineProcessorConfig(model_source="/m")
    assert config.runtime_env is None
    assert config.max_pending_requests is None
    assert config.max_concurrent_batches == 8
    assert config.max_tasks_in_flight_per_actor is None
    assert config.should_continue_on_error is False
    assert config.placement_group_config is None
    assert config.dynamic_lora_loading_path is None
    assert (config.chat_template_stage, config.tokenize_stage, config.detokenize_stage) == (True, True, True)
    assert config.prepare_multimodal_stage is False


@pytest.mark.parametrize("concurrency, kept", [(1, 1), (4, 4), ((1, 4), (1, 4)), ((2, 2), (2, 2)), ([2, 8], (2, 8))])
def test_concurrency_is_a_positive_int_or_a_min_max_pair(concurrency, kept):
    """Mirrors ProcessorConfig.validate_concurrency (accepted values; a JSON/YAML list is a pair)."""
    assert ProcessorConfig(concurrency=concurrency).concurrency == kept
    assert vLLMEngineProcessorConfig(model_source="/m", concurrency=concurrency).concurrency == kept


@pytest.mark.parametrize("concurrency", [0, -2, (0, 2), (3, 1), (-1, -1)])
def test_concurrency_out_of_range_is_refused(concurrency):
    """Mirrors ProcessorConfig.validate_concurrency (positive ints, min <= max)."""
    with pytest.raises(ValidationError, match="concurrency"):
        ProcessorConfig(concurrency=concurrency)
    with pytest.raises(ValidationError, match="concurrency"):
        TokenizerStageConfig(concurrency=concurrency)


@pytest.mark.parametrize("concurrency, engines", [(4, 4), ((1, 4), 4), ((2, 8), 8)])
def test_engine_pool_is_fixed_at_the_upper_bound(concurrency, engines):
    """Mirrors test_processor_no_blocking::test_concurrency_to_actor_pool_strategy, with llm_assets'
    deliberate difference: a fixed pool of the upper bound, not Ray's autoscaling pool."""
    assert vLLMEngineProcessorConfig(model_source="/m", concurrency=concurrency).engine_pool_size == engines


def test_max_tasks_in_flight_per_actor():
    """Ray 2.60's OfflineProcessorConfig.max_tasks_in_flight_per_actor: unset by default, kept as given."""
    assert (
        vLLMEngineProcessorConfig(model_source="/m", max_tasks_in_flight_per_actor=16).max_tasks_in_flight_per_actor
        == 16
    )
    with pytest.raises(ValidationError, match="max_tasks_in_flight_per_actor"):
        vLLMEngineProcessorConfig(model_source="/m", max_tasks_in_flight_per_actor=0)


@pytest.mark.parametrize("legacy", ["apply_chat_template", "tokenize", "detokenize", "has_image", "chat_template"])
def test_legacy_stage_flags_are_refused(legacy):
    """Mirrors test_backward_compat as of Ray 2.60, where the legacy flags are gone: refused, naming it."""
    with pytest.raises(ValidationError, match=legacy):
        vLLMEngineProcessorConfig(model_source="/m", **{legacy: True})


def test_unregistered_processor_config_is_refused():
    """Mirrors test_processor_base::test_builder: a config class is built by what is registered
    for it; one nobody registered is refused."""

    class MyProcessorConfig(ProcessorConfig):
        pass

    for config in (vLLMEngineProcessorConfig(model_source="/m"), HttpRequestProcessorConfig(url="http://h:1/v1")):
        assert type(engine_for(config).config) is type(config)
    with pytest.raises(TypeError, match="MyProcessorConfig"):
        engine_for(MyProcessorConfig())
    with pytest.raises(TypeError, match="config must be one of"):
        pipeline_of(MyProcessorConfig())


# --- stage configs (test_configs: resolve_stage_config) ----------------------------------------


@pytest.mark.parametrize(
    "field, cls",
    [
        ("chat_template_stage", ChatTemplateStageConfig),
        ("tokenize_stage", TokenizerStageConfig),
        ("detokenize_stage", DetokenizeStageConfig),
        ("prepare_multimodal_stage", PrepareMultimodalStageConfig),
    ],
)
def test_stage_value_as_bool_dict_or_typed_config(field, cls):
    """Mirrors test_configs::test_resolve_bool_true, test_resolve_bool_false, test_resolve_dict_to_config."""
    for value, enabled in ((True, True), (False, False)):
        stage = vLLMEngineProcessorConfig(model_source="/m", **{field: value}).stage(field)
        assert type(stage) is cls and stage.enabled is enabled
    stage = vLLMEngineProcessorConfig(
        model_source="/m", **{field: {"enabled": True, "batch_size": 128, "concurrency": 4}}
    ).stage(field)
    assert type(stage) is cls
    assert (stage.enabled, stage.batch_size, stage.concurrency) == (True, 128, 4)
    stage = vLLMEngineProcessorConfig(model_source="/m", **{field: cls(batch_size=7)}).stage(field)
    assert type(stage) is cls and stage.batch_size == 7


def test_stage_inherits_unset_fields_from_the_processor():
    """Mirrors test_configs::test_resolve_merges_processor_defaults and test_resolve_model_source_fallback
    (``chat_template_stage={"batch_size": 256}`` keeps the processor's model and runtime_env). One
    difference: an unset stage concurrency stays unset (the cluster's CPUs), not the processor's."""
    config = vLLMEngineProcessorConfig(
        model_source="/models/m",
        batch_size=64,
        concurrency=4,
        runtime_env={"env_vars": {"PROC_VAR": "1"}},
        chat_template_stage={"batch_size": 256},
    )
    chat = config.stage("chat_template_stage")
    assert (chat.batch_size, chat.model_source, chat.runtime_env) == (256, "/models/m", {"env_vars": {"PROC_VAR": "1"}})
    tokenize = config.stage("tokenize_stage")
    assert (tokenize.batch_size, tokenize.model_source) == (64, "/models/m")
    assert tokenize.concurrency is None
    # The plan builds each stage with the processor's model and the stage's batch size.
    pipeline = pipeline_of(config)
    plans = {name: pipeline.plan(name) for name in ("chat_template", "tokenize", "detokenize")}
    assert {name: (plan.model_source, plan.settings.batch_size) for name, plan in plans.items()} == {
        "chat_template": ("/models/m", 256),
        "tokenize": ("/models/m", 64),
        "detokenize": ("/models/m", 64),
    }


def test_stage_explicit_values_win_over_the_processors():
    """Mirrors test_configs::test_resolve_preserves_explicit_overrides."""
    config = vLLMEngineProcessorConfig(
        model_source="/m",
        batch_size=128,
        concurrency=4,
        tokenize_stage={"batch_size": 64, "concurrency": 2, "model_source": "/other"},
    )
    tokenize = config.stage("tokenize_stage")
    assert (tokenize.batch_size, tokenize.concurrency, tokenize.model_source) == (64, 2, "/other")
    assert pipeline_of(config).plan("tokenize").model_source == "/other"


def test_stage_runtime_env_replaces_the_processors():
    """Mirrors test_configs::test_resolve_runtime_env_replacement (replaced, not merged)."""
    config = vLLMEngineProcessorConfig(
        model_source="/m",
        runtime_env={"env_vars": {"PROC_VAR": "proc_value"}},
        tokenize_stage={"runtime_env": {"env_vars": {"STAGE_VAR": "stage_value"}}},
    )
    assert config.stage("tokenize_stage").runtime_env == {"env_vars": {"STAGE_VAR": "stage_value"}}


def test_one_typed_stage_config_serves_several_processors_unchanged():
    """Mirrors test_configs::test_resolve_typed_config_copied and test_resolve_same_config_reusable."""

    def chat(config):
        stage = config.stage("chat_template_stage")
        return stage.batch_size, stage.model_source

    shared = ChatTemplateStageConfig(enabled=True)
    first = vLLMEngineProcessorConfig(model_source="model1", batch_size=128, chat_template_stage=shared)
    second = vLLMEngineProcessorConfig(model_source="model2", batch_size=256, chat_template_stage=shared)
    assert (chat(first), chat(second)) == ((128, "model1"), (256, "model2"))
    assert (shared.batch_size, shared.model_source) == (None, None)
    explicit = ChatTemplateStageConfig(batch_size=64, model_source="mine")
    first.chat_template_stage = second.chat_template_stage = explicit
    assert (chat(first), chat(second)) == ((64, "mine"), (64, "mine"))
    assert (explicit.batch_size, explicit.model_source) == (64, "mine")


def test_stage_values_are_kept_as_given():
    """Mirrors test_backward_compat::test_legacy_dict_stage_config and test_explicit_stage_configs_preserved:
    a dict stays a dict on the config, a typed config stays that config."""
    typed = ChatTemplateStageConfig(enabled=False, batch_size=64)
    config = vLLMEngineProcessorConfig(
        model_source="/m", chat_template_stage=typed, tokenize_stage={"enabled": True, "concurrency": 4}
    )
    assert config.tokenize_stage == {"enabled": True, "concurrency": 4}
    assert isinstance(config.chat_template_stage, ChatTemplateStageConfig)
    assert (config.chat_template_stage.enabled, config.chat_template_stage.batch_size) == (False, 64)


@pytest.mark.parametrize("value", [123, None, [1]])
def test_stage_value_of_another_type_is_refused(value):
    """Mirrors test_configs::test_resolve_unsupported_type."""
    with pytest.raises(ValidationError, match="tokenize_stage"):
        vLLMEngineProcessorConfig(model_source="/m", tokenize_stage=value)


def test_prepare_multimodal_stage_config():
    """Mirrors test_configs' PrepareMultimodalStageConfig cases and test_resolve_stage_without_model_source:
    Ray 2.60's defaults, and the stage parses messages with the processor's model."""
    stage = PrepareMultimodalStageConfig()
    assert (stage.model_config_kwargs, stage.chat_template_content_format, stage.apply_sys_msg_formatting) == (
        None,
        "string",
        False,
    )
    config = vLLMEngineProcessorConfig(
        model_source="/models/vlm",
        prepare_multimodal_stage={
            "chat_template_content_format": "openai",
            "model_config_kwargs": {"max_model_len": 64},
        },
    )
    plan = pipeline_of(config).plan("prepare_multimodal")
    assert plan.model_source == "/models/vlm"
    assert plan.udf_kwargs["chat_template_content_format"] == "openai"
    assert plan.udf_kwargs["model_config_kwargs"] == {"max_model_len": 64}
    assert plan.udf_kwargs["apply_sys_msg_formatting"] is False


# --- vLLM and HTTP processors (test_vllm_engine_proc, test_http_request_proc) ------------------


def test_vllm_processor_stages_and_engine_settings():
    """Mirrors test_vllm_engine_proc::test_vllm_engine_processor: the stages in order, and what the
    engine gets (model, engine_kwargs, task_type, max_pending_requests...)."""
    config = vLLMEngineProcessorConfig(
        model_source="/models/m",
        engine_kwargs={"max_model_len": 8192},
        runtime_env={"env_vars": {"RANDOM_ENV_VAR": "12345"}},
        accelerator_type="L40S",
        concurrency=4,
        batch_size=64,
        max_pending_requests=111,
        prepare_multimodal_stage=True,
    )
    pipeline = pipeline_of(config)
    assert pipeline.stage_names() == [
        "preprocess",
        "prepare_multimodal",
        "chat_template",
        "tokenize",
        "engine",
        "detokenize",
        "postprocess",
    ]
    kwargs = engine_for(config).replica_kwargs("/models/m", on_gpu=True, engine_detokenizes=False)
    assert kwargs["model_source"] == "/models/m"
    # As given (no task_type written in, as Ray does), plus CUDA graphs for the whole decode batch
    # on a GPU (engines/vllm/batch_defaults.py), where Ray passes vLLM's server default on.
    graphs = {"compilation_config": {"max_cudagraph_capture_size": 1024}}
    assert kwargs["engine_kwargs"] == {"max_model_len": 8192, **graphs}
    assert kwargs["task_type"] == "generate"
    assert kwargs["max_pending_requests"] == 111
    assert kwargs["should_continue_on_error"] is False
    assert kwargs["log_engine_metrics"] is False
    assert config.engine_pool_size == 4
    assert config.accelerator_type == "L40S"
    for name in ("chat_template", "tokenize", "detokenize"):
        settings = pipeline.plan(name).settings
        assert settings.batch_size == 64
        assert settings.runtime_env["env_vars"]["RANDOM_ENV_VAR"] == "12345"


@pytest.mark.parametrize("task_type", ["generate", "embed", "classify", "score"])
def test_vllm_task_types_of_ray_are_accepted(task_type):
    """Mirrors vLLMEngineProcessorConfig.validate_task_type: Ray 2.60's vLLM task types are accepted."""
    assert vLLMEngineProcessorConfig(model_source="/m", task_type=task_type).task_type == task_type
    with pytest.raises(ValidationError, match="task_type"):
        vLLMEngineProcessorConfig(model_source="/m", task_type=task_type + "s")


def test_vllm_processor_without_optional_stages():
    """Mirrors the stage lists of Ray's vLLM processor tests with stages switched off."""
    config = vLLMEngineProcessorConfig(
        model_source="/m",
        chat_template_stage=ChatTemplateStageConfig(enabled=False),
        tokenize_stage=False,
        detokenize_stage={"enabled": False},
    )
    assert pipeline_of(config).stage_names() == ["preprocess", "engine", "postprocess"]


def test_log_engine_metrics_reaches_the_engine():
    """Ray 2.60's vLLMEngineProcessorConfig.log_engine_metrics (default differs: off here, on in Ray)."""
    assert vLLMEngineProcessorConfig(model_source="/m").log_engine_metrics is False
    config = vLLMEngineProcessorConfig(model_source="/m", log_engine_metrics=True)
    assert engine_for(config).replica_kwargs("/m", on_gpu=True, engine_detokenizes=False)["log_engine_metrics"] is True


def test_should_continue_on_error_reaches_the_engine_and_the_stages():
    """Ray 2.60's OfflineProcessorConfig.should_continue_on_error: the engine keeps failed rows, and
    postprocess gives every row the error column."""
    pipeline = pipeline_of({"model_source": "/m", "should_continue_on_error": True})
    assert engine_for(pipeline.config).replica_kwargs("/m", on_gpu=True, engine_detokenizes=False)[
        "should_continue_on_error"
    ]
    assert pipeline.plan("postprocess").udf_kwargs["should_continue_on_error"] is True
    assert pipeline.plan("tokenize").udf_kwargs["should_continue_on_error"] is True


def test_placement_group_config_without_strategy_is_a_dict_with_pack():
    """Mirrors test_vllm_engine_proc::test_gpu_placement_group_config_unset_strategy."""
    config = vLLMEngineProcessorConfig(
        model_source="m", placement_group_config={"bundle_per_worker": {"CPU": 1, "GPU": 1}}
    )
    assert config.placement_group_config == {
        "bundle_per_worker": {"CPU": 1.0, "GPU": 1.0},
        "bundles": None,
        "strategy": "PACK",
    }


def test_placement_group_config_keeps_an_explicit_strategy():
    """Mirrors test_vllm_engine_proc::test_gpu_explicit_strategy_preserved."""
    config = vLLMEngineProcessorConfig(
        model_source="m", placement_group_config={"bundles": [{"CPU": 1, "GPU": 1}], "strategy": "STRICT_PACK"}
    )
    assert config.placement_group_config["strategy"] == "STRICT_PACK"
    assert config.placement_group_config["bundles"] == [{"CPU": 1.0, "GPU": 1.0}]
    assert config.placement_group_config["bundle_per_worker"] is None


def test_http_request_processor():
    """Mirrors test_http_request_proc::test_http_request_processor: only the request stage between
    preprocess and postprocess; the URL, headers, qps and concurrency reach it."""
    config = HttpRequestProcessorConfig(
        url="http://localhost:8000",
        headers={"Authorization": "Bearer 1234567890"},
        qps=2,
        concurrency=4,
        batch_size=64,
    )
    assert pipeline_of(config).stage_names() == ["preprocess", "engine", "postprocess"]
    assert (config.qps, config.engine_pool_size, config.batch_size) == (2, 4, 64)
    # The replica's settings (without qps: a qps pacer is a Ray actor).
    kwargs = engine_for(config.model_copy(update={"qps": None})).replica_kwargs(
        config.url, on_gpu=False, engine_detokenizes=False
    )
    assert kwargs["url"] == "http://localhost:8000"
    assert kwargs["headers"] == {"Authorization": "Bearer 1234567890"}
    assert HttpRequestProcessorConfig(url="http://h:1").batch_size == 64  # Ray's HTTP default


@pytest.mark.xfail(
    strict=True,
    reason="HttpRequestProcessorConfig has no http_request_stage field (Ray 2.60 has one, with "
    "HttpRequestStageConfig): a ray.data.llm config that sets it fails to load",
)
def test_http_request_processor_takes_http_request_stage():
    """Mirrors test_http_request_proc::test_http_request_processor (Ray 2.60 version, with
    ``http_request_stage=HttpRequestStageConfig(num_cpus=0.5, memory=100000)``)."""
    config = HttpRequestProcessorConfig(
        url="http://localhost:8000", concurrency=4, http_request_stage={"num_cpus": 0.5, "memory": 100000}
    )
    assert config.http_request_stage == {"num_cpus": 0.5, "memory": 100000}


# --- preprocess / postprocess (test_stage_base: wrap_preprocess, wrap_postprocess) -------------


def test_preprocess_output_is_the_input_row_updated_with_the_functions():
    """Mirrors test_stage_base::test_wrap_preprocess: every input column is kept, the function's
    columns are added (and win)."""
    stage = preprocess_stage(lambda row: {"prompt": f"value {row['id'] * 2}", "extra": "memo2"})
    (row,) = stage(pa.table({"row_id": ["r0"], "id": [5], "extra": ["memo"], "other": [1.5]})).to_pylist()
    assert row["id"] == 5 and row["other"] == 1.5
    assert row["prompt"] == "value 10"
    assert row["extra"] == "memo2"


def test_preprocess_without_a_function_passes_rows_through():
    """Mirrors test_processor_base::test_processor_with_no_preprocess_or_postprocess (the row level)."""
    (row,) = preprocess_stage()(pa.table({"row_id": ["r0"], "id": [3], "prompt": ["hi"]})).to_pylist()
    assert (row["row_id"], row["id"], row["prompt"]) == ("r0", 3, "hi")
    assert PostprocessStage()(table_of([row])).to_pylist()[0]["id"] == 3


def test_postprocess_output_is_only_what_the_function_returns():
    """Mirrors test_stage_base::test_wrap_postprocess and test_processor_base::test_empty_processor:
    the columns the function does not return are dropped (llm_assets keeps row_id too)."""
    batch = table_of([{"row_id": "r0", "id": 5, "extra": "memo", "value": 10}])
    rows = PostprocessStage(lambda row: {"result": str(row["value"]), "extra": row["extra"]})(batch).to_pylist()
    assert rows == [{"result": "10", "extra": "memo", "row_id": "r0"}]


def test_postprocess_bypasses_error_rows():
    """Mirrors test_stage_base::test_wrap_postprocess_bypasses_error_rows: the function (which would
    crash on it) is not called for a failed row, which comes out whole."""
    batch = table_of(
        [{"row_id": "bad", ERROR_COLUMN: "ValueError: prompt too long", "prompt": "This is a long prompt"}]
    )
    rows = PostprocessStage(lambda row: {"response": row["generated_text"].upper()})(batch).to_pylist()
    assert rows == [{"row_id": "bad", ERROR_COLUMN: "ValueError: prompt too long", "prompt": "This is a long prompt"}]


def test_postprocess_runs_on_rows_whose_error_is_empty():
    """Mirrors test_stage_base::test_wrap_postprocess_success_rows_run_postprocess: "" means no error."""
    batch = table_of([{"row_id": "ok", "generated_text": "Hello world", "num_tokens": 10, ERROR_COLUMN: ""}])
    rows = PostprocessStage(lambda row: {"response": row["generated_text"], "tokens": row["num_tokens"]})(
        batch
    ).to_pylist()
    assert rows == [{"response": "Hello world", "tokens": 10, "row_id": "ok"}]


def test_postprocess_with_should_continue_on_error_writes_an_empty_error_on_good_rows():
    """Mirrors test_stage_base::test_wrap_postprocess_include_error_column: a good row's output has
    ``__inference_error__`` "" (Ray writes ""), a failed row bypasses the function, whole."""
    batch = table_of(
        [
            {"row_id": "ok", "generated_text": "Hello world", ERROR_COLUMN: ""},
            {"row_id": "bad", "generated_text": None, "prompt": "a long prompt", ERROR_COLUMN: "ValueError: too long"},
        ]
    )
    good, bad = PostprocessStage(lambda row: {"response": row["generated_text"]}, should_continue_on_error=True)(
        batch
    ).to_pylist()
    assert {k: v for k, v in good.items() if v is not None} == {
        "response": "Hello world",
        "row_id": "ok",
        ERROR_COLUMN: "",
    }
    assert {k: v for k, v in bad.items() if v is not None} == {
        "row_id": "bad",
        "prompt": "a long prompt",
        ERROR_COLUMN: "ValueError: too long",
    }


# --- error rows through the CPU stages (test_stage_base: test_error_rows_bypass_udf, ...) ------


def test_error_rows_pass_through_the_stages_untouched(fake_model):
    """Mirrors test_stage_base::TestStatefulStageUDF::test_error_rows_bypass_udf: a failed row, which
    lacks the stage's input, comes out as it went in; the rows around it are processed."""
    batch = table_of(
        [
            {"row_id": "a", "messages": [{"role": "user", "content": "one"}], ERROR_COLUMN: None},
            {"row_id": "bad", "messages": None, ERROR_COLUMN: "ValueError: prompt too long"},
            {"row_id": "c", "messages": [{"role": "user", "content": "three"}], ERROR_COLUMN: ""},
        ]
    )
    templated = ChatTemplateStage(fake_model)(batch)
    tokenized = TokenizeStage(fake_model)(templated)
    engine_like = tokenized.append_column("generated_tokens", pa.array([[5, 6], None, [7]], type=pa.list_(pa.int32())))
    rows = DetokenizeStage(fake_model)(engine_like).to_pylist()
    assert [r["row_id"] for r in rows] == ["a", "bad", "c"]
    for index in (0, 2):
        assert rows[index]["prompt"].startswith("<|im_start|>user\n")
        assert rows[index]["tokenized_prompt"] and isinstance(rows[index]["generated_text"], str)
    assert rows[1]["prompt"] is None and rows[1]["tokenized_prompt"] is None and rows[1]["generated_text"] is None
    assert rows[1][ERROR_COLUMN] == "ValueError: prompt too long"


def test_a_batch_of_error_rows_never_reaches_the_tokenizer(fake_model):
    """Mirrors test_stage_base::TestStatefulStageUDF::test_all_error_rows_in_batch."""
    batch = table_of(
        [
            {"row_id": "e1", "messages": None, "prompt": None, "generated_tokens": None, ERROR_COLUMN: "error 1"},
            {"row_id": "e2", "messages": None, "prompt": None, "generated_tokens": None, ERROR_COLUMN: "error 2"},
        ]
    )
    for stage in (ChatTemplateStage(fake_model), TokenizeStage(fake_model), DetokenizeStage(fake_model)):
        stage.tokenizer = Exploding()
        out = stage(batch)
        assert out.num_rows == 2
        assert out.column(ERROR_COLUMN).to_pylist() == ["error 1", "error 2"]
        assert out.column("row_id").to_pylist() == ["e1", "e2"]


# --- chat template (test_chat_template_stage) ------------------------------------------------


def test_chat_template_renders_each_rows_messages(fake_model):
    """Mirrors test_chat_template_stage::test_chat_template_udf_basic and _multiple_messages."""
    batch = table_of(
        [
            {"row_id": "r0", "id": 0, "messages": [{"role": "user", "content": "Hello AI"}]},
            {"row_id": "r1", "id": 1, "messages": [{"role": "user", "content": "How are you?"}]},
        ]
    )
    out = ChatTemplateStage(fake_model)(batch)
    assert out.column("prompt").to_pylist() == [
        "<|im_start|>user\nHello AI<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n",
    ]
    assert out.column("id").to_pylist() == [0, 1]  # the other columns carry on


def test_chat_template_continues_a_trailing_assistant_message(fake_model):
    """Mirrors test_chat_template_stage::test_chat_template_udf_assistant_prefill: after a user
    message the generation prompt is added; a trailing assistant message is continued (no
    generation prompt, no end of turn)."""
    batch = table_of(
        [
            {
                "row_id": "prefill",
                "messages": [{"role": "user", "content": "Hello AI"}, {"role": "assistant", "content": "Sure,"}],
            },
            {"row_id": "user", "messages": [{"role": "user", "content": "How are you?"}]},
        ]
    )
    prefill, user = ChatTemplateStage(fake_model)(batch).column("prompt").to_pylist()
    assert prefill == "<|im_start|>user\nHello AI<|im_end|>\n<|im_start|>assistant\nSure,"
    assert user == "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"


THINKING_TEMPLATE = (
    "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% if enable_thinking is defined and not enable_thinking %}"
    "Answer without thinking{% else %}<think>{% endif %}{% endif %}"
)


@pytest.mark.parametrize(
    "chat_template_kwargs, ending",
    [
        ({"enable_thinking": False}, "[assistant] Answer without thinking"),
        ({"enable_thinking": True}, "[assistant] <think>"),
        ({}, "[assistant] <think>"),
    ],
)
def test_chat_template_kwargs_reach_the_template(fake_model, chat_template_kwargs, ending):
    """Mirrors test_chat_template_stage::test_chat_template_udf_chat_template_kwargs, set as a user
    sets them: ``chat_template_stage={"chat_template": ..., "chat_template_kwargs": ...}``."""
    pipeline = pipeline_of(
        {
            "model_source": fake_model,
            "chat_template_stage": {"chat_template": THINKING_TEMPLATE, "chat_template_kwargs": chat_template_kwargs},
        }
    )
    stage = stage_from_plan(pipeline, "chat_template", fake_model)
    (prompt,) = (
        stage(table_of([{"row_id": "r0", "messages": [{"role": "user", "content": "Hello AI"}]}]))
        .column("prompt")
        .to_pylist()
    )
    assert prompt == f"[user] Hello AI\n{ending}"


# --- tokenize / detokenize (test_tokenize_stage) ---------------------------------------------


def test_tokenize_gives_each_prompt_its_token_ids(fake_model):
    """Mirrors test_tokenize_stage::test_tokenize_udf_basic for rows with a plain ``prompt``: the
    tokenizer's ids, special tokens included, as in Ray; the prompt is kept."""
    tokenizer = load_tokenizer(fake_model)
    batch = table_of([{"row_id": "r0", "prompt": "Hello"}, {"row_id": "r1", "prompt": "World"}])
    out = TokenizeStage(fake_model)(batch)
    assert out.column("tokenized_prompt").to_pylist() == tokenizer(["Hello", "World"])["input_ids"]
    assert out.column("tokenized_prompt").to_pylist()[0][0] == tokenizer.bos_token_id
    assert out.column("prompt").to_pylist() == ["Hello", "World"]


def test_tokenize_does_not_add_special_tokens_to_a_templated_prompt(fake_model):
    """test_tokenize_stage::test_tokenize_udf_basic on a chat-templated prompt: llm_assets'
    deliberate difference (no second BOS before the template's own text; Ray 2.60 adds it)."""
    tokenizer = load_tokenizer(fake_model)
    batch = table_of([{"row_id": "r0", "messages": [{"role": "user", "content": "Hello"}]}])
    out = TokenizeStage(fake_model)(ChatTemplateStage(fake_model)(batch))
    (prompt,) = out.column("prompt").to_pylist()
    (ids,) = out.column("tokenized_prompt").to_pylist()
    assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] != tokenizer.bos_token_id
    assert ids != tokenizer(prompt)["input_ids"]  # what Ray 2.60 would give


def test_detokenize_decodes_without_special_tokens(fake_model):
    """Mirrors test_tokenize_stage::test_detokenize_udf_basic (decode with skip_special_tokens=True)."""
    tokenizer = load_tokenizer(fake_model)
    hello = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    world = tokenizer("World", add_special_tokens=False)["input_ids"]
    batch = table_of(
        [
            {"row_id": "r0", "generated_tokens": hello + [tokenizer.eos_token_id]},
            {"row_id": "r1", "generated_tokens": [tokenizer.bos_token_id] + world},
        ]
    )
    assert DetokenizeStage(fake_model)(batch).column("generated_text").to_pylist() == ["Hello", "World"]


# --- imports (test_lazy_imports) -----------------------------------------------------------------

HEAVY_MODULES = ("vllm", "sglang", "torch", "transformers", "tokenizers", "huggingface_hub", "aiohttp", "dagster")


def test_defining_pipelines_imports_no_engine_or_ml_library():
    """Mirrors test_lazy_imports::test_import_ray_data_llm_does_not_import_heavy_deps and
    test_http_request_processor_does_not_import_heavy_deps: importing the package, building vLLM
    and HTTP configs and planning their pipelines (what loading definitions does) loads none of the
    engine or ML libraries, nor Dagster. In a fresh interpreter, so that nothing is loaded already."""
    script = textwrap.dedent(
        f"""
        import sys
        from llm_assets import HttpRequestProcessorConfig, LLMPipeline, LocalFolderSource, vLLMEngineProcessorConfig

        configs = [
            vLLMEngineProcessorConfig(model_source="/m", prepare_multimodal_stage=True),
            HttpRequestProcessorConfig(url="http://h:1/v1"),
        ]
        for config in configs:
            pipeline = LLMPipeline("p", config, LocalFolderSource("/in"))
            [pipeline.plan(name) for name in pipeline.stage_names()]
        print(",".join(name for name in {HEAVY_MODULES!r} if name in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_lazy_package_attributes():
    """Mirrors test_lazy_imports::test_unknown_attr_raises_attribute_error and test_dir_lists_lazy_attrs:
    the lazily imported component is listed and resolves; an unknown name is an AttributeError."""
    assert {"LLMPipelineComponent", "vLLMEngineProcessorConfig", "HttpRequestProcessorConfig"} <= set(dir(llm_assets))
    assert llm_assets.LLMPipelineComponent.__module__ == "llm_assets.defs.component"
    assert not hasattr(llm_assets, "DefinitelyNotAProcessor")
    with pytest.raises(AttributeError):
        llm_assets.DefinitelyNotAProcessor  # noqa: B018
