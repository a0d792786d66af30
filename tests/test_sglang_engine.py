"""The SGLang engine without a GPU: its config (ray.data.llm's fields and defaults), rows'
sampling params as SGLang takes them, and the errors a user gets before any GPU work. The engine
itself runs in tests/test_gpu.py on the H100 test machine (SGLang ships CUDA builds only)."""

import re

import pytest

from llm_assets import SGLangEngineProcessorConfig
from llm_assets.defs.factory import stage_key
from llm_assets.engines.sglang.params import check_row_params, to_sglang
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from tests.helpers.data import questions, write_jsonl
from tests.helpers.pipelines import assert_failed_before_any_engine, make_resources, run_job, to_answer, to_chat


def test_config_takes_ray_data_llm_fields_and_defaults():
    config = SGLangEngineProcessorConfig(
        model_source="/m",
        engine_kwargs={"context_length": 2048},
        concurrency=2,
        batch_size=16,
        max_concurrent_batches=4,
        max_pending_requests=512,
        should_continue_on_error=True,
    )
    assert config.resolved_engine_kwargs() == {
        "tp_size": 1,
        "dp_size": 1,
        "skip_tokenizer_init": True,
        "context_length": 2048,
    }
    assert config.gpus_per_replica == 1 and config.engine_pool_size == 2
    assert (
        SGLangEngineProcessorConfig(model_source="/m", engine_kwargs={"tp_size": 2, "dp_size": 2}).gpus_per_replica == 4
    )
    # Without a Detokenize stage the engine writes the text: it keeps its tokenizer.
    assert (
        SGLangEngineProcessorConfig(model_source="/m", detokenize_stage=False).resolved_engine_kwargs()[
            "skip_tokenizer_init"
        ]
        is False
    )


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"task_type": "embed"}, "the SGLang engine runs 'generate' only"),
        ({"engine_kwargs": {"model_path": "/other"}}, "engine_kwargs.model_path: the model is model_source"),
        ({"engine_kwrags": {}}, "did you mean 'engine_kwargs'"),
    ],
)
def test_config_errors_name_the_field(settings, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        SGLangEngineProcessorConfig(model_source="/m", **settings)


def test_vllm_names_become_sglangs_and_sglangs_pass_through():
    assert to_sglang(
        {
            "max_tokens": 32,
            "min_tokens": 2,
            "seed": 7,
            "temperature": 0,
            "top_p": 0.9,
            "stop_token_ids": [2, 3],
            "ignore_eos": True,
            "include_stop_str_in_output": True,
            "detokenize": False,
            "n": 1,
        }
    ) == {
        "max_new_tokens": 32,
        "min_new_tokens": 2,
        "sampling_seed": 7,
        "temperature": 0,
        "top_p": 0.9,
        "stop_token_ids": [2, 3],
        "ignore_eos": True,
        "no_stop_trim": True,
    }
    native = {"max_new_tokens": 8, "regex": "[0-9]+", "stop_regex": "\\.$"}
    assert to_sglang(native) == native


def test_structured_outputs_map_to_sglangs_constraints():
    assert to_sglang({"structured_outputs": {"json": {"type": "object"}}}) == {"json_schema": '{"type": "object"}'}
    assert to_sglang({"structured_outputs": {"grammar": 'root ::= "a"'}}) == {"ebnf": 'root ::= "a"'}
    choice = to_sglang({"structured_outputs": {"choice": ["yes", "no (maybe)"]}})["regex"]
    assert re.fullmatch(choice, "no (maybe)") and re.fullmatch(choice, "yes") and not re.fullmatch(choice, "no")


@pytest.mark.parametrize(
    "params, problem",
    [
        ({"logprobs": 5}, "sampling_params.logprobs has no SGLang equivalent"),
        (
            {"max_tokens": 8, "max_new_tokens": 8},
            "sets SGLang's 'max_new_tokens', which another field of the row sets too",
        ),
        ({"structured_outputs": {"regex": "a"}, "json_schema": "{}"}, "SGLang takes one constraint per request"),
        ({"n": 2}, "n must be 1"),
    ],
)
def test_params_sglang_cannot_honour_are_errors_naming_the_field(params, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        to_sglang(params)


def test_stop_strings_and_constraints_need_the_engines_tokenizer():
    for params in ({"stop": ["\n"]}, {"structured_outputs": {"choice": ["a", "b"]}}):
        with pytest.raises(ValueError, match="skip_tokenizer_init"):
            check_row_params(params, text_in_engine=False)
        check_row_params(params, text_in_engine=True)
    check_row_params({"stop_token_ids": [2]}, text_in_engine=False)


def sglang_pipeline(folder, model, preprocess=to_chat) -> LLMPipeline:
    config = SGLangEngineProcessorConfig(model_source=model, engine_kwargs={"context_length": 512}, batch_size=4)
    return LLMPipeline("tiny", config, LocalFolderSource(str(folder)), preprocess=preprocess, postprocess=to_answer)


def test_a_run_without_a_gpu_fails_at_its_start_saying_sglang_needs_one(tmp_path, tiny_model, ray_session, instance):
    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(3))
    pipeline = sglang_pipeline(tmp_path / "landing", tiny_model)
    result = run_job(
        pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"}, raise_on_error=False
    )
    assert_failed_before_any_engine(
        result, instance, tmp_path / "storage", "the SGLang engine runs on NVIDIA GPUs only"
    )
    assert not (tmp_path / "storage" / "tiny" / "preprocess").exists()  # nothing started


def test_preprocess_refuses_a_param_sglang_cannot_honour_naming_the_row(tmp_path, tiny_model, ray_session, instance):
    """Found on CPU, in Preprocess (here selected alone: no engine is needed for it)."""
    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(3))

    def with_logprobs(row):
        return {**to_chat(row), "sampling_params": {"max_tokens": 4, "logprobs": 2}}

    pipeline = sglang_pipeline(tmp_path / "landing", tiny_model, preprocess=with_logprobs)
    resources = make_resources(tmp_path / "storage")
    from llm_assets.defs.factory import add_partitions_for_new_files, build_definitions

    add_partitions_for_new_files(instance, pipeline)
    job = build_definitions([pipeline], resources).resolve_job_def("tiny_job")
    result = job.execute_in_process(
        instance=instance,
        partition_key="a.jsonl",
        raise_on_error=False,
        asset_selection=[stage_key(pipeline, "preprocess")],
    )
    assert_failed_before_any_engine(
        result, instance, tmp_path / "storage", "row 'a.jsonl:0': sampling_params.logprobs has no SGLang equivalent"
    )
