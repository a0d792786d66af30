"""A run's chain of stages as one Ray Data dataset.

    read (one task per file) -> map_batches(CpuStages) per group of CPU stages
      -> [map_batches(CacheLookup)] -> map_batches(EngineStage) on a fixed actor pool
      -> map_batches(CpuStages) writing the engine's output, then the stages after it

Consecutive CPU stages with the same settings (``batch_size``, ``concurrency``, ``num_cpus``,
``memory``, ``runtime_env``) are one ``map_batches`` (one pool of Ray actors, one tokenizer per
worker); a stage whose settings differ is a ``map_batches`` of its own, as in ray.data.llm. A CPU
stage's ``concurrency`` has ray.data.llm 2.60's meaning: ``n`` is an actor pool that scales from 1
to ``n``, ``(m, n)`` one from ``m`` to ``n``; unset, from 1 to a quarter of the cluster's CPUs (at
least the engine count). The engine stage is a fixed pool of ``concurrency`` actors with
``max_concurrent_batches`` batches running in each and ``max_tasks_in_flight_per_actor`` queued.

A partition enters at its first stage that is not up to date: its reads join the dataset
(``union``) just before that stage's operator, and a group of CPU stages is cut where a partition
enters.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from llm_assets.config import DEFAULT_STAGE_NUM_CPUS, Concurrency
from llm_assets.execution.cache import CacheLookup, CacheSettings
from llm_assets.execution.cpu_stages import CpuStages, StageSpec, Targets
from llm_assets.execution.engine_stage import EngineStage
from llm_assets.execution.reads import ReadItem, read_dataset
from llm_assets.private_apis import ray_data_async_batches_per_task, ray_data_rebatched
from llm_assets.secret_env import split_runtime_env
from llm_assets.tasks import ENGINE

LOOKUP_CPUS = 0.25  # a response cache lookup's actor (of its own where partitions join just before the engine)


@dataclass
class EngineOp:
    """The engine stage's operator: its UDF's kwargs and the Ray options of its actors."""

    kwargs: dict[str, Any]
    options: dict[str, Any]  # num_cpus, num_gpus, runtime_env, accelerator_type, max_restarts
    target: str  # what the engines serve (a model, a URL), for log lines
    size: int
    batch_size: int
    max_concurrency: int
    max_tasks_in_flight: Optional[int] = None
    remote_args_fn: Any = None  # a placement group per actor (execution/engine_placement.py)


@dataclass
class ChainData:
    pipeline: Any
    chain: list[str]
    reads: dict[int, list[ReadItem]]  # chain index where they enter -> the files
    targets: Targets
    ledger: Any
    stage_kwargs: dict[str, dict[str, Any]]  # each CPU stage's UDF kwargs (local model folders)
    cluster_cpus: float
    engine: Optional[EngineOp] = None
    cache: Optional[tuple[Any, CacheSettings]] = None  # (the stored keys' object ref, the settings)
    operators: list = field(default_factory=list)


@dataclass
class Op:
    """One operator of the chain: ``cpu`` (CPU stages; a leading ``ENGINE`` writes the engine's
    output) or ``engine``. ``start``: the chain index of the first stage it computes, where
    partitions entering there join (None for the group after the engine: nothing joins there)."""

    kind: str
    stages: list[str]
    start: Optional[int]
    looks_up: bool = False  # the CPU group before the engine also looks rows up in the response cache


def operators(pipeline, chain: list[str], entries: set[int]) -> list[Op]:
    ops: list[Op] = []
    for index, stage in enumerate(chain):
        if stage == ENGINE:
            if ops and ops[-1].kind == "cpu" and index not in entries:
                ops[-1].looks_up = True  # no partition joins between it and the engine
            ops += [Op("engine", [ENGINE], index), Op("cpu", [ENGINE], None)]
            continue
        last = ops[-1] if ops else None
        if (
            last is not None
            and last.kind == "cpu"
            and index not in entries
            and _settings_key(pipeline, stage) == _settings_key(pipeline, _first_cpu(last.stages) or stage)
        ):
            last.stages.append(stage)
        else:
            ops.append(Op("cpu", [stage], index))
    return ops


def lookup_of_its_own(ops: list[Op], engine_number: int) -> bool:
    """Whether the engine operator at ``engine_number`` needs a response cache lookup operator of
    its own: partitions join just before it, so the CPU group before it cannot look their rows up."""
    return not (engine_number and ops[engine_number - 1].looks_up)


def group_name(stages: list[str]) -> str:
    """A CPU group's name, which Ray Data gives its operator: ``chat_template+tokenize``."""
    return "+".join("engine_output" if stage == ENGINE else stage for stage in stages)


def _first_cpu(stages: list[str]) -> Optional[str]:
    return next((stage for stage in stages if stage != ENGINE), None)


def _settings_key(pipeline, stage: str) -> tuple:
    settings = pipeline.plan(stage).settings
    env = json.dumps(settings.runtime_env or {}, sort_keys=True, default=repr)
    return settings.batch_size, json.dumps(settings.concurrency), settings.num_cpus, settings.memory, env


def cpu_pool(concurrency: Optional[Concurrency], default_max: int) -> dict[str, int]:
    """ActorPoolStrategy's arguments for a CPU stage (ray.data.llm 2.60's meaning)."""
    if concurrency is None:
        return {"min_size": 1, "max_size": max(1, default_max)}
    if isinstance(concurrency, int):
        return {"min_size": 1, "max_size": concurrency}
    return {"min_size": concurrency[0], "max_size": concurrency[1]}


def build(data: ChainData):
    """The chain's dataset: every partition's reads joined in before their entry stage."""
    import ray

    reads = dict(data.reads)
    data.operators = operators(data.pipeline, data.chain, set(reads))
    ds = None
    for number, op in enumerate(data.operators):
        if op.start in reads:
            read = read_dataset(reads.pop(op.start), data.ledger, data.cluster_cpus)
            ds = read if ds is None else ds.union(read)
        if ds is None:
            continue  # every partition enters at a later stage
        if op.kind == "engine":
            ds = _engine(ds, data, own_lookup=lookup_of_its_own(data.operators, number))
        else:
            ds = _cpu_group(ds, data, op, last=number == len(data.operators) - 1)
    if reads:
        raise RuntimeError(f"reads entering at chain positions {sorted(reads)} met no operator of {data.chain}")
    return ray.data.from_items([]) if ds is None else ds


def _cpu_group(ds, data: ChainData, op: Op, last: bool):
    from ray.data import ActorPoolStrategy

    pipeline, group = data.pipeline, op.stages
    settings_stage = _first_cpu(group) or group[0]
    settings = pipeline.plan(settings_stage).settings if settings_stage != ENGINE else None
    specs = []
    for stage in group:
        if stage == ENGINE:
            cache_only = {"cache_only": True} if data.engine is None else {}
            specs.append(StageSpec(ENGINE, None, cache_only, dict(pipeline.engine.count_columns)))
        else:
            specs.append(StageSpec(stage, pipeline.plan(stage).udf, data.stage_kwargs[stage]))
    if op.looks_up and data.cache is not None:
        specs.append(StageSpec("response cache lookup", CacheLookup, _lookup_kwargs(data), write=False))
    options, pool, secret_env = cpu_group_options(
        pipeline, op, data.engine.size if data.engine else 1, data.cluster_cpus
    )
    batch_size = (settings.batch_size if settings else None) or pipeline.config.batch_size
    # A class per group, named by its stages: Ray Data names the operator after it (its log, stats,
    # dashboard): MapBatches(chat_template+tokenize).
    named = type(group_name(group), (CpuStages,), {})
    return ds.map_batches(
        named,
        fn_constructor_kwargs={
            "stages": specs,
            "targets": data.targets,
            "ledger": data.ledger,
            "secret_env": secret_env,
            "last": last,
            "cache": data.cache[1] if data.cache and group[0] == ENGINE else None,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=ActorPoolStrategy(**pool),
        **options,
    )


def cpu_group_options(pipeline, op: Op, engines: int, cluster_cpus: float) -> tuple[dict, dict, dict]:
    """A CPU group's Ray options (num_cpus, memory, runtime_env), its actor pool and the secret
    part of its runtime_env, from its first CPU stage's settings."""
    settings_stage = _first_cpu(op.stages)
    settings = pipeline.plan(settings_stage).settings if settings_stage else None
    runtime_env, secret_env = split_runtime_env(settings.runtime_env if settings else None)
    options: dict[str, Any] = {"num_cpus": settings.num_cpus if settings else DEFAULT_STAGE_NUM_CPUS}
    if settings is not None and settings.memory:
        options["memory"] = settings.memory
    if runtime_env:
        options["runtime_env"] = runtime_env
    pool = cpu_pool(settings.concurrency if settings else None, max(engines, int(cluster_cpus) // 4))
    return options, pool, secret_env


def smallest_pools(pipeline, chain: list[str], entries: set[int], engine: Optional[EngineOp], cluster_cpus, cache):
    """(operator, logical CPUs) that each actor pool of the chain's dataset holds at its smallest,
    engines aside: Ray Data starts these actors with the execution and keeps them to its end.
    ``cache``: the run's response cache, or None."""
    engines = engine.size if engine else 1
    held = []
    ops = operators(pipeline, chain, entries)
    first = next((number for number, op in enumerate(ops) if op.start in entries), len(ops))
    for number, op in enumerate(ops):
        if number < first:  # before any partition enters: build() makes no operator of it
            continue
        if op.kind == "engine":
            if cache is not None and lookup_of_its_own(ops, number):
                held.append(("MapBatches(CacheLookup)", LOOKUP_CPUS))
            continue
        options, pool, _ = cpu_group_options(pipeline, op, engines, cluster_cpus)
        held.append((f"MapBatches({group_name(op.stages)})", pool["min_size"] * options["num_cpus"]))
    return held


def _lookup_kwargs(data: ChainData) -> dict[str, Any]:
    index_ref, settings = data.cache
    return {"index": [index_ref], "settings": settings, "filesystem": data.targets.filesystem}


def _engine(ds, data: ChainData, own_lookup: bool):
    from ray.data import ActorPoolStrategy

    op, config = data.engine, data.pipeline.config
    if data.cache is not None and own_lookup:
        ds = ds.map_batches(
            CacheLookup,
            fn_constructor_kwargs=_lookup_kwargs(data),
            batch_size=config.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ActorPoolStrategy(min_size=1, max_size=config.engine_pool_size),
            num_cpus=LOOKUP_CPUS,
        )
    if op is None:  # the response cache answers the run (a sample of its rows said so): no engine
        return ds
    # Blocks of a few batches: a map task's outputs join into one block until 128 MiB, so a file
    # read as one block would reach the engine as one task, and its answers would be written (and
    # resumable) only once its last row was answered. A block of as many batches as Ray Data runs
    # at once in one task keeps each engine as busy as whole files would (max_concurrent_batches
    # tasks, each running that many batches), and its answers are written as each block is done.
    ds = ray_data_rebatched(ds, op.batch_size * ray_data_async_batches_per_task(), num_cpus=0)
    kwargs = {**op.kwargs, "ledger": data.ledger, "answer_columns": data.cache[1].answer_columns if data.cache else ()}
    named = {key: value for key, value in op.options.items() if key != "max_restarts"}
    if op.remote_args_fn is not None:
        named["ray_remote_args_fn"] = op.remote_args_fn
    with warnings.catch_warnings():
        # Ray 2.60 deprecates the remote arguments Ray Data has no named parameter for yet: the
        # actors' max_restarts, and ray_remote_args_fn (a placement group per actor), which
        # ray.data.llm 2.60 passes the same way.
        warnings.filterwarnings("ignore", message=".*ray_remote_args(_fn)?` is deprecated", category=DeprecationWarning)
        return ds.map_batches(
            EngineStage,
            fn_constructor_kwargs=kwargs,
            batch_size=op.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ActorPoolStrategy(
                size=op.size,
                max_tasks_in_flight_per_actor=op.max_tasks_in_flight,
                max_concurrent_calls_per_actor=op.max_concurrency,
            ),
            max_restarts=op.options["max_restarts"],
            **named,
        )
