"""Processor configs: ray.data.llm's field names and defaults, and errors that name the field."""

import pytest
from pydantic import ValidationError

from llm_assets import vLLMEngineProcessorConfig
from llm_assets.config import ChatTemplateStageConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource


def test_defaults_match_ray_data_llm():
    config = vLLMEngineProcessorConfig(model_source="/m")
    assert config.batch_size == 32
    assert config.concurrency == 1
    assert config.max_concurrent_batches == 8
    assert config.max_pending_requests is None
    assert config.should_continue_on_error is False
    assert config.task_type == "generate"
    assert config.engine_kwargs == {}
    assert config.stage("chat_template_stage").enabled
    assert config.stage("tokenize_stage").enabled
    assert config.stage("detokenize_stage").enabled
    assert not config.stage("prepare_multimodal_stage").enabled


def test_stage_config_inherits_unset_fields_from_the_processor():
    config = vLLMEngineProcessorConfig(
        model_source="/m",
        batch_size=64,
        concurrency=(1, 3),
        runtime_env={"env_vars": {"A": "1"}},
        tokenize_stage={"batch_size": 8},
        chat_template_stage=ChatTemplateStageConfig(chat_template="{{ messages }}", num_cpus=2),
        detokenize_stage=False,
    )
    tokenize = config.stage("tokenize_stage")
    # CPU stages are not tied to the engine count: unset concurrency means the cluster's CPUs.
    assert (tokenize.batch_size, tokenize.concurrency, tokenize.model_source) == (8, None, "/m")
    assert tokenize.runtime_env == {"env_vars": {"A": "1"}}
    chat = config.stage("chat_template_stage")
    assert (chat.batch_size, chat.num_cpus, chat.chat_template) == (64, 2, "{{ messages }}")
    assert not config.stage("detokenize_stage").enabled
    assert config.engine_pool_size == 3


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"batch_sise": 3}, "batch_sise"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": (3, 1)}, "concurrency"),
        ({"batch_size": "many"}, "batch_size"),
        ({"task_type": "translate"}, "task_type"),
        ({"tokenize_stage": {"enabled": True, "batchsize": 3}}, "batchsize"),
        ({"chat_template_stage": {"num_cpus": -1}}, "num_cpus"),
        ({"placement_group_config": {"strategy": "PACK"}}, "exactly one of 'bundle_per_worker'"),
        ({"placement_group_config": {"bundles": [{"GPU": 1}], "bundle_per_worker": {"GPU": 1}}}, "exactly one of"),
        ({"placement_group_config": {"bundle_per_worker": {"GPU": 1}, "strategy": "TIGHT"}}, "strategy"),
        (
            {"placement_group_config": {"bundles": [{"GPU": 2}]}, "engine_kwargs": {"tensor_parallel_size": 2}},
            "one GPU",
        ),
        (
            {"placement_group_config": {"bundles": [{"GPU": 1}]}, "engine_kwargs": {"tensor_parallel_size": 2}},
            "1 bundle(s) with a GPU for 2",
        ),
        ({"prepare_multimodal_stage": {"chat_template_content_format": "html"}}, "chat_template_content_format"),
        ({"prepare_multimodal_stage": True, "chat_template_stage": False}, "needs chat_template_stage"),
    ],
)
def test_bad_config_fails_naming_the_field(fields, named):
    with pytest.raises(ValidationError) as info:
        vLLMEngineProcessorConfig(model_source="/m", **fields)
    assert named in str(info.value)


def test_pipeline_takes_a_dict_config_and_rejects_bad_names(tmp_path):
    pipeline = LLMPipeline("p", {"model_source": "/m", "detokenize_stage": False}, LocalFolderSource(str(tmp_path)))
    assert pipeline.stage_names() == ["preprocess", "chat_template", "tokenize", "engine", "postprocess"]
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        LLMPipeline("my pipeline", {"model_source": "/m"}, LocalFolderSource(str(tmp_path)))
    # One line naming the closest valid field, as a user reads it at definition load.
    with pytest.raises(ValueError) as info:
        LLMPipeline("p", {"model_source": "/m", "engine_kwarg": {}}, LocalFolderSource(str(tmp_path)))
    assert (
        str(info.value)
        == "pipeline 'p': vLLMEngineProcessorConfig has no field 'engine_kwarg' (did you mean 'engine_kwargs'?)"
    )
    with pytest.raises(ValueError) as info:
        LLMPipeline("p", {"model_source": "/m", "tokenize_stage": {"batchsize": 3}}, LocalFolderSource(str(tmp_path)))
    assert (
        str(info.value)
        == "pipeline 'p': tokenize_stage: TokenizerStageConfig has no field 'batchsize' (did you mean 'batch_size'?)"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained pydantic block


def test_the_cli_reports_a_bad_config_in_one_line(tmp_path):
    """`python -m llm_assets.cli add-partitions` on a code location with a misspelt field: the
    user's mistake as one line on stderr (not the import machinery's traceback), exit code 2."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "definitions.py").write_text(
        "from llm_assets import LLMPipeline\n"
        "from llm_assets.sources import LocalFolderSource\n"
        "PIPELINES = [LLMPipeline('mine', {'model_source': '/m', 'batchsize': 64}, LocalFolderSource('/in'))]\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(
        [sys.executable, "-m", "llm_assets.cli", "add-partitions", "-f", "definitions.py"],
        cwd=tmp_path,
        env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: definitions.py failed to load: ValueError: pipeline 'mine': vLLMEngineProcessorConfig has no field "
        "'batchsize' (did you mean 'batch_size'?) (--verbose for the traceback)"
    ]


def test_an_engine_left_at_the_default_concurrency_gets_rows_for_three_times_its_batch():
    """Unset max_concurrent_batches: enough Ray Data tasks (4 batches each) at once to keep three
    times the engine's max_num_seqs in flight, never fewer than the default 8; set, as asked."""
    from llm_assets import HttpRequestProcessorConfig
    from llm_assets.engines import engine_for
    from llm_assets.execution.engines import concurrent_batches

    def calls(config, on_gpu):
        return concurrent_batches(config, engine_for(config).sequences_at_once(on_gpu))

    unset = vLLMEngineProcessorConfig(model_source="/m")
    assert calls(unset, on_gpu=True) == 24  # 3 x 1024 sequences / (4 x 32 rows)
    assert calls(unset, on_gpu=False) == 8  # 3 x 256 / 128 = 6, below the default
    assert calls(vLLMEngineProcessorConfig(model_source="/m", batch_size=256), on_gpu=True) == 8
    piped = {"max_num_seqs": 512, "pipeline_parallel_size": 2}
    assert calls(vLLMEngineProcessorConfig(model_source="/m", engine_kwargs=piped), on_gpu=True) == 24
    assert calls(vLLMEngineProcessorConfig(model_source="/m", max_concurrent_batches=8), on_gpu=True) == 8
    assert calls(vLLMEngineProcessorConfig(model_source="/m", max_concurrent_batches=2), on_gpu=True) == 2
    assert calls(HttpRequestProcessorConfig(url="http://127.0.0.1:9/v1/chat/completions"), on_gpu=True) == 8


def test_a_gpu_engine_gets_cuda_graphs_for_its_whole_decode_batch_unless_the_user_settled_them():
    """vLLM graphs batches of up to 512 tokens; a batch job decodes max_num_seqs (1024) at once.
    The engine kwargs a GPU replica is built with cover the decode batch; the CPU build (eager),
    speculative decoding, pooling and any graph setting of the user's are left alone."""
    from llm_assets.engines import engine_for

    def built(on_gpu=True, task_type="generate", **engine_kwargs):
        config = vLLMEngineProcessorConfig(model_source="/m", task_type=task_type, engine_kwargs=engine_kwargs)
        kwargs = engine_for(config).replica_kwargs("/m", on_gpu=on_gpu, engine_detokenizes=False)["engine_kwargs"]
        return kwargs.get("compilation_config")

    assert built() == {"max_cudagraph_capture_size": 1024}
    assert built(max_num_seqs=2048) == {"max_cudagraph_capture_size": 2048}
    assert built(max_num_seqs=2048, max_num_batched_tokens=1536) == {"max_cudagraph_capture_size": 1536}
    assert built(compilation_config={"pass_config": {}}) == {"pass_config": {}, "max_cudagraph_capture_size": 1024}
    assert built(max_num_seqs=256) is None  # vLLM's own 512 covers it
    assert built(on_gpu=False) is None  # the CPU build runs eager
    assert built(enforce_eager=True) is None
    assert built(speculative_config={"method": "ngram", "num_speculative_tokens": 2}) is None
    assert built(task_type="embed") is None
    assert built(compilation_config={"cudagraph_mode": "NONE"}) == {"cudagraph_mode": "NONE"}
    assert built(compilation_config={"cudagraph_capture_sizes": [1, 8]}) == {"cudagraph_capture_sizes": [1, 8]}
    assert built(compilation_config={"max_cudagraph_capture_size": 256}) == {"max_cudagraph_capture_size": 256}
    assert built(compilation_config=3) == 3
