"""What an engine's cold start compiles, kept on its node for the next run (engines/compile_cache.py):
on vLLM's CPU build with compilation asked for (its default there is eager)."""

from pathlib import Path

import pytest

from tests.helpers.data import questions, write_jsonl
from tests.helpers.pipelines import (
    engine_materialization,
    log_messages,
    make_pipeline,
    make_resources,
    read_output,
    run_job,
)

pytestmark = pytest.mark.slow


def cache_entries(cache: Path) -> set[Path]:
    """vLLM's entries in the cache: a folder per hash of what its compiled graphs depend on."""
    graphs = cache / "vllm" / "torch_compile_cache"
    return {path for pattern in ("*", "*/*") for path in graphs.glob(pattern) if path.is_dir()}


def test_a_run_loads_what_a_run_before_compiled_and_a_changed_setting_compiles_anew(
    tmp_path, tiny_model, ray_session, instance
):
    cache, landing = tmp_path / "compile-cache", tmp_path / "landing"
    resources = make_resources(tmp_path / "storage")

    def run(partition: str, **engine_kwargs):
        write_jsonl(landing / f"{partition}.jsonl", questions(3))  # the same questions in every file
        pipeline = make_pipeline(
            landing,
            tiny_model,
            engine_kwargs={"max_model_len": 512, "enforce_eager": False, **engine_kwargs},
            runtime_env={"env_vars": {"LLM_ASSETS_COMPILE_CACHE": str(cache)}},
        )
        result = run_job(pipeline, resources, instance, tags={"dagster/partition": f"{partition}.jsonl"})
        assert result.success
        [engine] = engine_materialization(instance, result.run_id)["engine_placement"]
        [started] = [m for m in log_messages(instance, result.run_id) if "vLLM engine 0 started" in m]
        output = read_output(resources["storage"].store(), "postprocess", f"{partition}.jsonl")
        print(started)  # how long each start took, for the reader of the test's output
        assert "cuda_graph_max_tokens" not in engine  # the CPU build runs no CUDA graphs
        return engine["compile_cache"], started, [row["answer"] for row in output]

    outcome, started, first_answers = run("first")
    assert outcome == "compiled"
    assert f"compiled its model, kept in {cache / 'vllm' / 'torch_compile_cache'} for the next run" in started
    first_entries = cache_entries(cache)
    assert first_entries

    outcome, started, answers = run("second")  # a new partition, the same settings: a fresh engine actor
    assert outcome == "reused" and "loaded its compiled model from" in started
    assert cache_entries(cache) == first_entries  # no new entry
    assert answers == first_answers  # the loaded model computes what the compiled one did

    outcome, started, _ = run("third", max_model_len=256)  # a setting the compiled graphs depend on
    assert outcome == "compiled"
    assert cache_entries(cache) > first_entries  # an entry beside the first, which stays
