"""Every private Dagster and Ray API the library uses, one function each, with why no public API
does it. Imports happen inside each function, so this module imports neither library itself.
(vLLM's private names are in ``engines/vllm/compat.py``, the one module that knows vLLM's builds.)
If a release moves one of these, this is the one place to look."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

# --- Dagster ----------------------------------------------------------------------------------------


def dagster_data_version_tags() -> tuple[str, str]:
    """The tags Dagster writes a materialization's code version and an observation's data version
    under (``dagster/code_version``, ``dagster/data_version``): a stage whose partitions failed is
    recorded per partition with AssetMaterialization, which Dagster gives no code version of its
    own; the landing files' observations carry their fingerprint as the data version. No public
    constant names them."""
    from dagster._core.definitions.data_version import CODE_VERSION_TAG, DATA_VERSION_TAG

    return CODE_VERSION_TAG, DATA_VERSION_TAG


def dagster_data_provenance(entry: Any) -> Any:
    """The input data versions a materialization recorded (``DataProvenance``): which landing
    observation a stage ran after, to tell a stale partition as Dagster's UI does. No public API
    reads it from an event log entry."""
    from dagster._core.definitions.data_version import extract_data_provenance_from_entry

    return extract_data_provenance_from_entry(entry)


def dagster_data_version(entry: Any) -> Any:
    """The data version an observation or materialization recorded (from its event log entry)."""
    from dagster._core.definitions.data_version import extract_data_version_from_entry

    return extract_data_version_from_entry(entry)


def component_tree_exception() -> type[BaseException]:
    """The error Dagster wraps a component's load error in (``ComponentTreeException``): a YAML
    pipeline's located mistake is unwrapped from it so that its ``file:line`` is the first line a
    user reads. Dagster's components package does not export it."""
    from dagster.components.core.component_tree import ComponentTreeException

    return ComponentTreeException


# --- Ray ----------------------------------------------------------------------------------------------


def ray_object_store_summary(gcs_address: str) -> str:
    """What ``ray memory --stats-only`` prints (the object store's use and spills), for a stalled
    run's report: no public API gives it."""
    from ray._private.internal_api import memory_summary

    return memory_summary(address=gcs_address, stats_only=True)


def ray_started_by_this_process() -> bool:
    """Whether this process started the Ray cluster it is connected to (a run's local Ray, which
    ends with the run), rather than connecting to one that outlives it: no public API says it."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return bool(node is not None and node.is_head())


def serve_run_without_blocking(app: Any, name: str) -> None:
    """Deploy a Serve application and return at once (``serve._run(..., _blocking=False)``): the
    run goes on and its engine clients wait for the replicas. ``serve.run`` waits until every
    replica is up, minutes for an engine that compiles."""
    from ray import serve

    serve._run(app, name=name, route_prefix=None, _blocking=False)


def ray_data_execution_callback(on_step: Any, key: str) -> type:
    """A Ray Data ``ExecutionCallback`` class whose every scheduling-loop step calls
    ``on_step(key, executor)``: the run keeps the executor (for its operators' state) and ends the
    execution by raising there. Ray Data instantiates the classes of
    ``DataContext.custom_execution_callback_classes`` itself, and ships the context to its workers:
    the class holds only ``key`` (``on_step`` is a module-level function). The interface is not
    exported."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class _OnStep(ExecutionCallback):
        def on_execution_step(self, executor: Any) -> None:
            on_step(key, executor)

    return _OnStep


def ray_data_operator_states(executor: Any) -> list[str]:
    """One line per operator of a running Ray Data execution (tasks running, blocks queued, the
    actor pool's actors), for a stalled run's report: Ray Data shows it only on its progress bars."""
    lines = []
    for op, state in executor._topology.items():
        line = f"Ray Data {op.name}: {op.num_active_tasks()} task(s) running, "
        line += f"{state.total_enqueued_input_blocks()} block(s) queued"
        info = op.get_actor_info() if hasattr(op, "get_actor_info") else None
        if info is not None and (info.running or info.pending or info.restarting):
            line += f", actors {info.running} running, {info.pending} pending, {info.restarting} restarting"
        lines.append(line)
    return lines


def ray_actor_death(actor_id: str) -> Any:
    """Why Ray's GCS says an actor died (its death cause's message), or None while it is not dead:
    a task's error can say only that the actor is unavailable, before Ray has marked its node
    lost. No public API reads one actor's record without the dashboard's state API."""
    import ray

    record = ray._private.state.actors(actor_id=actor_id) or {}
    if record.get("State") != "DEAD":
        return None
    return record["DeathCause"].actor_died_error_context.error_message or "no cause recorded"


def ray_data_async_batches_per_task() -> int:
    """How many batches of one task Ray Data runs at once in an async UDF (4 unless
    RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY says otherwise): the engine stage's blocks
    are that many batches, so each of its tasks keeps the engine as busy as a whole file's would.
    Ray Data exports no name for it."""
    from ray.data._internal.planner.plan_udf_map_op import DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY

    return DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY


def ray_data_rebatched(dataset: Any, rows: int, num_cpus: float) -> Any:
    """``dataset.repartition(target_num_rows_per_block=rows)`` whose tasks ask ``num_cpus``: Ray
    Data gives this operator no remote arguments and its tasks take a whole CPU, which a cluster
    whose CPUs the stage actors already hold never frees (the run waits forever). The tasks only
    slice Arrow tables."""
    rebatched = dataset.repartition(target_num_rows_per_block=rows)
    rebatched._logical_plan.dag.ray_remote_args["num_cpus"] = num_cpus
    return rebatched


def ray_data_actors(executor: Any, operator_name: str) -> list:
    """The actor handles of a running Ray Data execution's actor pool operator: the run holds its
    engine actors' handles so that they outlive the execution until their engines have shut
    down (Ray Data lets its actors go by dropping its handles as the execution ends). Ray Data
    exposes no handle of its actors."""
    handles: list = []
    for op in executor._topology:
        pool = getattr(op, "_actor_pool", None)
        if op.name == operator_name and pool is not None:
            handles.extend(pool._running_actors)
            handles.extend(pool._pending_actors.values())
    return handles


class RayNeededBeforeItStarted(BaseException):
    """A function the driver runs before Ray is up called a Ray API. A BaseException, so that a
    row function's ``except Exception`` does not turn it into a row error."""


_refusing = threading.Lock()


@contextmanager
def ray_auto_init_refused() -> Iterator[None]:
    """While the driver runs a user's function before Ray is up (the input checks), a Ray API
    the function calls raises RayNeededBeforeItStarted instead of starting Ray: Ray's automatic
    ``ray.init()`` would start a Ray without the run's settings, and, called from a checking
    thread, one whose GCS and raylet Linux kills when that thread ends (Ray ties them to the
    starting thread), taking the run down a minute later. No public API turns auto-init off once
    Ray is imported (``RAY_ENABLE_AUTO_CONNECT`` is read at import)."""
    from ray._private import auto_init_hook

    def refuse() -> None:
        import ray

        if not ray.is_initialized():
            raise RayNeededBeforeItStarted()

    with _refusing:
        started = auto_init_hook.auto_init_ray
        auto_init_hook.auto_init_ray = refuse
        try:
            yield
        finally:
            auto_init_hook.auto_init_ray = started
