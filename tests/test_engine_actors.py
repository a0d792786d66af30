"""The engine actors of a run: the processes an engine runs in, placement groups for engines that
span several workers, and placements refused before any engine starts. (Feeding the actors,
restarting a dead one and handing its batches back is Ray Data's: tests/test_resilience.py.)"""

import os

import psutil
import pytest
import ray

from llm_assets.engines.host import EngineHost, engine_actor_options
from llm_assets.execution.engines import RunEngines
from llm_assets.models import resolve_model_source
from llm_assets.ray_session import RaySession
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


def test_an_engine_core_in_its_own_process_is_forked_from_the_actors_server_and_ends_with_the_actor(
    tmp_path, tiny_model, ray_session
):
    """The GPU default, exercised on the CPU build by asking for it: vLLM's engine core runs in a
    process of its own, forked from the fork server the engine actor started while importing vLLM
    (not spawned), generates, and is gone soon after its actor is killed (no orphan holding a GPU).
    The actor has the options a run's engine actors get (engine_actor_options)."""
    import json

    import pyarrow as pa

    pipeline = make_pipeline(
        tmp_path / "landing", tiny_model, runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}}
    )
    engine, model = pipeline.engine, resolve_model_source(tiny_model)
    options, secret_env = engine_actor_options(engine, engine.config, False, 1.0, 0, 1)
    host = ray.remote(EngineHost).options(**options).remote(engine, False, secret_env)
    info = ray.get(host.start.remote(**engine.replica_kwargs(model, False, True)), timeout=300)
    batch = pa.table(
        {
            "row_id": ["r0", "r1"],
            "prompt": ["Hello", "Count: one two"],
            "sampling_params": [json.dumps({"max_tokens": 4, "temperature": 0})] * 2,
        }
    )
    output, rows = ray.get(host.process.remote(batch), timeout=120)
    assert rows == 2 and all(n == 4 for n in output.column("num_generated_tokens").to_pylist())

    actor_process = psutil.Process(info["pid"])
    children = actor_process.children()
    servers = [p for p in children if "multiprocessing.forkserver" in " ".join(p.cmdline())]
    assert len(servers) == 1, [p.cmdline() for p in children]
    cores = servers[0].children()
    assert cores, "no engine core process under the fork server"
    # Not the lower priority of Ray's workers (and the CPU stages'): the engine's processes run at the normal one.
    assert [p.nice() for p in [actor_process, *servers, *cores]] == [0] * (2 + len(cores))
    # Without a GPU the engine computes on this machine's cores, not on Ray's one thread per reserved CPU.
    assert actor_process.environ()["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))

    ray.kill(host)
    gone, alive = psutil.wait_procs(cores + servers, timeout=60)
    assert not alive, f"still running after their actor was killed: {[p.pid for p in alive]}"


def test_an_engine_with_two_workers_reserves_one_placement_group_and_generates_as_one_worker_does(
    tmp_path, tiny_model, ray_session, instance
):
    """tensor_parallel_size=2 with placement_group_config (ray.data.llm's field, a dict): the run's
    engine actor starts in a placement group of the two bundles, vLLM's two workers run the model
    (the CPU build's own worker processes: it has no Ray executor), the tokens equal one worker's,
    and the group is removed when the run ends."""
    from ray.util.placement_group import placement_group_table

    write_jsonl(tmp_path / "landing" / "x.jsonl", questions(3))
    single = make_pipeline(tmp_path / "landing", tiny_model)
    run_job(single, make_resources(tmp_path / "one"), instance, {"dagster/partition": "x.jsonl"})
    expected = read_output(make_resources(tmp_path / "one")["storage"].store(), "postprocess", "x.jsonl")

    before = set(placement_group_table())
    config = {"bundle_per_worker": {"CPU": 1}, "strategy": "STRICT_PACK"}
    # vLLM's CPU workers need their cores named where the machine has one NUMA node (vLLM's message says so).
    pipeline = make_pipeline(
        tmp_path / "landing",
        tiny_model,
        engine_kwargs={"max_model_len": 512, "tensor_parallel_size": 2},
        placement_group_config=config,
        runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}},
    )
    assert pipeline.config.placement_group_config["strategy"] == "STRICT_PACK"
    resources = make_resources(tmp_path / "two")
    result = run_job(pipeline, resources, instance, {"dagster/partition": "x.jsonl"})
    assert read_output(resources["storage"].store(), "postprocess", "x.jsonl") == expected
    [where] = engine_materialization(instance, result.run_id)["engine_placement"]
    assert where["node_id"] == ray.get_runtime_context().get_node_id()
    messages = log_messages(instance, result.run_id)
    assert any("placement group of 2 x {'CPU': 1.0} (STRICT_PACK)" in m for m in messages), messages
    groups = {group_id: group for group_id, group in placement_group_table().items() if group_id not in before}
    assert [group["bundles"] for group in groups.values()] == [{0: {"CPU": 1.0}, 1: {"CPU": 1.0}}]
    assert [group["state"] for group in groups.values()] == ["REMOVED"]


def test_a_placement_the_cluster_cannot_hold_fails_before_any_engine_starts(tmp_path, tiny_model, ray_session):
    """Ray would leave such a group pending for ever; the run is told what is missing instead."""
    pipeline = make_pipeline(
        tmp_path / "landing",
        tiny_model,
        concurrency=2,
        engine_kwargs={"max_model_len": 512, "tensor_parallel_size": 2},
        placement_group_config={"bundle_per_worker": {"GPU": 1, "CPU": 1}},
    )
    with pytest.raises(ValueError, match=r"2 engine\(s\) each reserving 2 x .*need 4 GPU; the Ray cluster has 0"):
        RunEngines(RaySession()).operator(pipeline, resolve_model_source(tiny_model), print)


def test_an_engine_that_runs_in_its_first_bundle_needs_its_gpu_there():
    from llm_assets.engines.placement import ReplicaPlacement, check_fits

    one_worker = ReplicaPlacement([{"CPU": 1}], "PACK", actor_gpus=1)
    with pytest.raises(ValueError, match=r"needs 1 GPU there; that bundle is \{'CPU': 1\}"):
        check_fits(one_worker, 1, "vLLM for m")


def test_pipeline_parallel_on_the_cpu_build_is_refused_before_any_engine_starts(tmp_path, tiny_model, ray_session):
    """vLLM's CPU build fails PP=2 in its own LLM class (measured with 0.32): the run is told at once."""
    pipeline = make_pipeline(
        tmp_path / "landing", tiny_model, engine_kwargs={"max_model_len": 512, "pipeline_parallel_size": 2}
    )
    with pytest.raises(ValueError, match="pipeline_parallel_size > 1 does not run on vLLM's CPU build"):
        RunEngines(RaySession()).operator(pipeline, resolve_model_source(tiny_model), print)
