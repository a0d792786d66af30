"""The engine pool resource across the steps of one run process."""

import pytest
import ray

from llm_assets.models import resolve_model_source
from llm_assets.resources import EnginePoolResource, RayDataResource
from tests.helpers.pipelines import make_pipeline

pytestmark = pytest.mark.slow


def test_engines_released_by_one_step_are_ended_before_the_next_step_gets_its_own(tmp_path, tiny_model, ray_session):
    """A released pool shuts down without holding up its run; a pool asked for after it (the next
    step of an in-process run, say) waits until those engines are gone, so they never hold the
    GPUs the new engines claim."""
    resource = EnginePoolResource(ray_data=RayDataResource()).engines()
    pipeline = make_pipeline(tmp_path / "landing", tiny_model)
    model = resolve_model_source(tiny_model)
    first = resource.pool_for(pipeline, model, print)
    first_actors = [replica.actor for replica in first.replicas]
    ray.get([replica.placed_ref for replica in first.replicas])
    resource.release(first)
    assert first.shutting_down and first.replicas  # asked to stop, not waited for

    second = resource.pool_for(pipeline, model, print)
    assert first.replicas == []
    for actor in first_actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=30)
    resource.shutdown_engines()
    assert second.replicas == []


def test_an_engine_core_in_its_own_process_is_forked_from_the_actors_server_and_ends_with_the_actor(
    tmp_path, tiny_model, ray_session
):
    """The GPU default, exercised on the CPU build by asking for it: vLLM's engine core runs in a
    process of its own, forked from the fork server the engine actor started while importing vLLM
    (not spawned), generates, and is gone soon after its actor is killed (no orphan holding a GPU)."""
    import json

    import psutil
    import pyarrow as pa

    resource = EnginePoolResource(ray_data=RayDataResource()).engines()
    pipeline = make_pipeline(
        tmp_path / "landing", tiny_model, runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}}
    )
    pool = resource.pool_for(pipeline, resolve_model_source(tiny_model), print)
    pool.build()
    replica = pool.replicas[0]
    info = ray.get(replica.start_ref, timeout=300)
    batch = pa.table(
        {
            "row_id": ["r0", "r1"],
            "prompt": ["Hello", "Count: one two"],
            "sampling_params": [json.dumps({"max_tokens": 4, "temperature": 0})] * 2,
        }
    )
    output, rows = ray.get(replica.actor.process.remote(batch), timeout=120)
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
    import os

    assert actor_process.environ()["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))

    ray.kill(replica.actor)
    gone, alive = psutil.wait_procs(cores + servers, timeout=60)
    assert not alive, f"still running after their actor was killed: {[p.pid for p in alive]}"
    pool.replicas = []
    resource.shutdown_engines()


def _first_tokens(pool, prompts: list[str]) -> list[list[int]]:
    import json

    import pyarrow as pa

    pool.build()
    replica = pool.replicas[0]
    pool.settle(replica.start_ref)  # records where the engine started (usage's placement)
    batch = pa.table(
        {
            "row_id": [f"r{i}" for i in range(len(prompts))],
            "prompt": prompts,
            "sampling_params": [json.dumps({"max_tokens": 6, "temperature": 0})] * len(prompts),
        }
    )
    output, _ = ray.get(replica.actor.process.remote(batch), timeout=180)
    return output.column("generated_tokens").to_pylist()


def test_an_engine_with_two_workers_reserves_one_placement_group_and_generates_as_one_worker_does(
    tmp_path, tiny_model, ray_session
):
    """tensor_parallel_size=2 with placement_group_config (ray.data.llm's field): the replica's
    two bundles are reserved as one group before the engine actor starts in it, vLLM's two
    workers run the model (the CPU build's own worker processes: it has no Ray executor), the
    tokens equal one worker's, and the group is freed with the engine."""
    from ray.util.placement_group import placement_group_table

    resource = EnginePoolResource(ray_data=RayDataResource()).engines()
    model = resolve_model_source(tiny_model)
    prompts = ["Hello", "Count: one two", "The sky is"]
    single = resource.pool_for(make_pipeline(tmp_path / "landing", tiny_model), model, print)
    expected = _first_tokens(single, prompts)
    resource.shutdown_engines()

    lines = []
    # vLLM's CPU workers need their cores named where the machine has one NUMA node (vLLM's message says so).
    pipeline = make_pipeline(
        tmp_path / "landing",
        tiny_model,
        engine_kwargs={"max_model_len": 512, "tensor_parallel_size": 2},
        placement_group_config={"bundle_per_worker": {"CPU": 1}, "strategy": "STRICT_PACK"},
        runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}},
    )
    pool = resource.pool_for(pipeline, model, lines.append)
    group = pool.replicas[0].group
    assert placement_group_table(group)["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 1.0}}
    assert placement_group_table(group)["strategy"] == "STRICT_PACK"
    assert _first_tokens(pool, prompts) == expected
    [where] = pool.usage()["placement"]
    assert where["bundle_nodes"] == [ray.get_runtime_context().get_node_id()] * 2
    assert any("placement group of 2 x {'CPU': 1.0} (STRICT_PACK)" in line for line in lines), lines
    resource.shutdown_engines()
    assert placement_group_table(group)["state"] == "REMOVED"


def test_a_placement_the_cluster_cannot_hold_fails_before_any_engine_starts(tmp_path, tiny_model, ray_session):
    """Ray would leave such a group pending for ever; the run is told what is missing instead."""
    resource = EnginePoolResource(ray_data=RayDataResource()).engines()
    pipeline = make_pipeline(
        tmp_path / "landing",
        tiny_model,
        concurrency=2,
        engine_kwargs={"max_model_len": 512, "tensor_parallel_size": 2},
        placement_group_config={"bundle_per_worker": {"GPU": 1, "CPU": 1}},
    )
    with pytest.raises(ValueError, match=r"2 engine\(s\) each reserving 2 x .*need 4 GPU; the Ray cluster has 0"):
        resource.pool_for(pipeline, resolve_model_source(tiny_model), print)


def test_an_engine_that_runs_in_its_first_bundle_needs_its_gpu_there():
    from llm_assets.engines.placement import ReplicaPlacement, check_fits

    one_worker = ReplicaPlacement([{"CPU": 1}], "PACK", actor_gpus=1)
    with pytest.raises(ValueError, match=r"needs 1 GPU there; that bundle is \{'CPU': 1\}"):
        check_fits(one_worker, 1, "vLLM for m")


def test_pipeline_parallel_on_the_cpu_build_is_refused_before_any_engine_starts(tmp_path, tiny_model, ray_session):
    """vLLM's CPU build fails PP=2 in its own LLM class (measured with 0.32): the run is told at once."""
    resource = EnginePoolResource(ray_data=RayDataResource()).engines()
    pipeline = make_pipeline(
        tmp_path / "landing", tiny_model, engine_kwargs={"max_model_len": 512, "pipeline_parallel_size": 2}
    )
    with pytest.raises(ValueError, match="pipeline_parallel_size > 1 does not run on vLLM's CPU build"):
        resource.pool_for(pipeline, resolve_model_source(tiny_model), print)


def test_a_dead_engines_batches_are_handed_back_once_however_many_of_their_references_come_back_together(
    tmp_path, tiny_model, ray_session
):
    """An engine killed with three batches in flight: the run's wait returns all three failed
    references at once. The first hands back every batch (to send again) and starts a new engine;
    the other two settle as nothing, instead of failing the run as references the pool no longer
    knows (seen in the two-node test when a worker node died)."""
    import json

    import pyarrow as pa

    resource = EnginePoolResource(ray_data=RayDataResource(), max_engine_restarts=1).engines()
    pipeline = make_pipeline(tmp_path / "landing", tiny_model)
    pool = resource.pool_for(pipeline, resolve_model_source(tiny_model), print)
    pool.build()
    replica = pool.replicas[0]
    ray.wait([replica.start_ref], timeout=300)
    pool.settle(replica.start_ref)  # the engine is ready
    for tag in ("a", "b", "c"):
        batch = ray.put(
            pa.table(
                {
                    "row_id": [f"{tag}0"],
                    "prompt": ["Count: one two"],
                    "sampling_params": [json.dumps({"max_tokens": 64, "ignore_eos": True})],
                }
            )
        )
        pool.submit(replica, tag, batch, 1)
    refs = list(replica.pending)
    ray.kill(replica.actor)
    ready, _ = ray.wait(refs, num_returns=3, timeout=60)
    assert len(ready) == 3
    settled = [pool.settle(ref) for ref in ready]
    lost = [tag for _, handed_back in settled for tag, _, _ in handed_back]
    assert sorted(lost) == ["a", "b", "c"] and all(done == [] for done, _ in settled)
    assert pool.replicas[0] is not replica and pool.restarts_left == 0  # a new engine is building
    resource.shutdown_engines()


def test_an_engine_ready_before_the_others_takes_only_what_it_runs_at_once(tmp_path, tiny_model, ray_session):
    """Rows queued while engines build are shared: the first engine ready takes its max_num_seqs
    rows, not its whole window, until the others are ready too (on the 4-GPU machine the first
    of two TP=2 engines took 3 072 of 4 000 rows and the other idled for 14 s)."""
    import json

    import pyarrow as pa

    resource = EnginePoolResource(ray_data=RayDataResource()).engines()
    pipeline = make_pipeline(
        tmp_path / "landing",
        tiny_model,
        concurrency=2,
        batch_size=4,
        engine_kwargs={"max_model_len": 512, "max_num_seqs": 8},
    )
    pool = resource.pool_for(pipeline, resolve_model_source(tiny_model), print)
    pool.build()
    batch = ray.put(
        pa.table(
            {
                "row_id": [f"r{i}" for i in range(4)],
                "prompt": ["Count: one two"] * 4,
                "sampling_params": [json.dumps({"max_tokens": 1})] * 4,
            }
        )
    )

    def fill() -> list[int]:
        """Submit batches as the run does, while the pool has a free engine: the engines chosen."""
        chosen = []
        while (replica := pool.free_replica()) is not None:
            pool.submit(replica, len(chosen), batch, 4)
            chosen.append(replica.index)
        return chosen

    (first_ref,), _ = ray.wait([replica.start_ref for replica in pool.replicas], num_returns=1, timeout=300)
    pool.settle(first_ref)
    first = next(replica for replica in pool.replicas if replica.info is not None)
    assert fill() == [first.index] * 2 and first.load_rows == 8  # max_num_seqs, with the other engine building
    second = next(replica for replica in pool.replicas if replica is not first)
    ray.wait([second.start_ref], timeout=300)
    pool.settle(second.start_ref)
    assert pool.window_rows > 8  # the whole window once every engine is ready
    chosen = fill()
    assert chosen[:2] == [second.index] * 2  # the engine with nothing yet comes first
    assert first.load_rows == second.load_rows == pool.window_rows
    resource.shutdown_engines()
