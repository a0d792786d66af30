"""How a chain of selected stages is cut into steps: CPU task groups around the engine.

Consecutive CPU stages with the same resources (``num_cpus``, ``memory``, ``runtime_env``,
``concurrency``) run in one Ray task per unit (``execution/units.py``), each writing its own
output; the engine stage is a step of its own, served by the engine pool; the first task after
the engine writes the engine's output (the engine actor never spends its time on Parquet).
Preprocess runs in a task of its own (it loads no tokenizer): a bad row fails it within a second
or two, and its partitions commit while the tokenizer stages' workers are still starting.

A step keeps at most its stages' ``concurrency`` tasks in flight or, unset, a quarter of the
cluster's CPUs (at least 2): the CPU stages only need to stay ahead of the engine, and every task
in flight is a Ray worker process with its own tokenizer, competing with the engine's own loop
for CPU and memory. Until its first task is back a step sends one task at a time, so the first
unit is not slowed down by a crowd of workers importing the same modules, unless the engines are
still building: the first unit would only wait for them, and loading the tokenizer in every
worker at once (13-17 s each on a busy GPU host) then overlaps the build instead of following it.

The groups after Preprocess run on Ray workers of their own: Ray reuses an idle worker only for a
task with the same runtime_env, and each such group's runtime_env names the group
(``LLM_ASSETS_STAGE_GROUP``). Without that, the tokenizer stages' tasks landed on workers that had
only run Preprocess or Postprocess and loaded the tokenizer again: 20 of 316 tasks on a 32-core GPU
host, up to 17 s each (docs/benchmarks.md, sitting 14), while the engine waited. Preprocess, which
loads nothing, keeps the default runtime_env: its first task takes one of the workers Ray starts
with each run, and the engine build waits for that task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from llm_assets.config import max_concurrency
from llm_assets.secret_env import split_runtime_env
from llm_assets.tasks import ENGINE

# Ray tasks of one group in flight at most, when the stages set no concurrency.
MAX_TASKS_IN_FLIGHT = 32
# A task that took longer than this to build its stages loaded a tokenizer (or model files).
COLD_SETUP_S = 0.5
# Set in the runtime_env of each group after Preprocess (the group's stages): Ray workers of its own.
GROUP_ENV_VAR = "LLM_ASSETS_STAGE_GROUP"


def chains(pipeline, selected: list[str]) -> list[list[str]]:
    """The selected stages as runs of consecutive stages, in pipeline order."""
    names = pipeline.stage_names()
    runs: list[list[str]] = []
    for name in names:
        if name not in selected:
            continue
        if runs and names.index(runs[-1][-1]) == names.index(name) - 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


@dataclass
class TaskTimes:
    """How a group's tasks spent their time, summed over the run: waiting to start (from the
    driver's submit to the worker's start: a busy cluster, or a worker process being started),
    running, on CPU (running far longer than on CPU: starved of cores, or waiting on storage),
    and building the stages (loading a tokenizer: a worker new to the stage)."""

    tasks: int = 0
    wait_s: float = 0.0
    run_s: float = 0.0
    cpu_s: float = 0.0
    setup_s: float = 0.0
    longest_wait_s: float = 0.0
    longest_run_s: float = 0.0
    longest_setup_s: float = 0.0
    cold: int = 0  # tasks that spent over COLD_SETUP_S building their stages: a worker new to them

    def add(self, submitted: float, report: dict) -> None:
        wait = max(0.0, report["started"] - submitted)  # clocks of two processes (or nodes)
        self.tasks += 1
        self.wait_s += wait
        self.run_s += report["run_s"]
        self.cpu_s += report["cpu_s"]
        self.setup_s += report["setup_s"]
        self.longest_wait_s = max(self.longest_wait_s, wait)
        self.longest_run_s = max(self.longest_run_s, report["run_s"])
        self.longest_setup_s = max(self.longest_setup_s, report["setup_s"])
        self.cold += report["setup_s"] > COLD_SETUP_S

    def line(self, stages: str) -> str:
        n = max(self.tasks, 1)
        return (
            f"tasks of {stages}: {self.tasks}; per task on average (longest): waited {self.wait_s / n:.3f} s "
            f"({self.longest_wait_s:.1f} s) to start, ran {self.run_s / n:.3f} s ({self.longest_run_s:.1f} s), "
            f"{self.cpu_s / n:.3f} s of it on CPU, {self.setup_s / n:.3f} s ({self.longest_setup_s:.1f} s) "
            "building its stages; "
            f"{self.cold} spent over {COLD_SETUP_S:g} s building them (a worker new to the stages)"
        )


@dataclass
class Group:
    """Consecutive CPU stages run by one Ray task per unit."""

    stages: list[str]  # chain stage names; ENGINE here means "write the engine's output"
    options: dict[str, Any]
    secret_env: dict[str, str]
    max_in_flight: int
    queue: list = field(default_factory=list)
    in_flight: dict = field(default_factory=dict)  # written-ref -> (unit, table ref, submitted at)
    completed: int = 0
    times: TaskTimes = field(default_factory=TaskTimes)

    def room(self, engines_building: bool = False) -> bool:
        return len(self.in_flight) < (self.max_in_flight if self.completed or engines_building else 1)

    def label(self) -> str:
        return ", ".join(s for s in self.stages if s != ENGINE) or "writing the engine's output"


def _resources(pipeline, stage: str) -> tuple:
    settings = pipeline.plan(stage).settings
    env = json.dumps(settings.runtime_env or {}, sort_keys=True, default=repr)
    return settings.num_cpus, settings.memory, env, settings.concurrency


def _group(pipeline, stages: list[str], cluster_cpus: float) -> Group:
    cpu_stages = [s for s in stages if s != ENGINE] or stages
    settings = pipeline.plan(cpu_stages[0]).settings
    options: dict[str, Any] = {"num_cpus": settings.num_cpus, "num_returns": 2}
    if settings.memory:
        options["memory"] = settings.memory
    runtime_env, secret_env = split_runtime_env(settings.runtime_env)
    if pipeline.plan(stages[0]).upstream is not None:  # not Preprocess, which reads the source
        runtime_env = {
            **runtime_env,
            "env_vars": {**(runtime_env.get("env_vars") or {}), GROUP_ENV_VAR: "+".join(stages)},
        }
    if runtime_env:
        options["runtime_env"] = runtime_env
    explicit = max_concurrency(settings.concurrency)
    limit = explicit if explicit is not None else min(MAX_TASKS_IN_FLIGHT, max(2, int(cluster_cpus) // 4))
    return Group(stages, options, secret_env, limit)


def build_steps(pipeline, chain: list[str], cluster_cpus: float) -> list[Optional[Group]]:
    """The chain's steps in order: a Group, or None for the engine."""
    steps: list[Optional[Group]] = []
    current: list[str] = []
    for stage in chain:
        if stage == ENGINE:
            if current:
                steps.append(_group(pipeline, current, cluster_cpus))
            steps.append(None)
            current = [ENGINE]  # the next task writes the engine's output
            continue
        first_stage = current and pipeline.plan(current[-1]).upstream is None
        if (
            current
            and current != [ENGINE]
            and (first_stage or _resources(pipeline, current[-1]) != _resources(pipeline, stage))
        ):
            steps.append(_group(pipeline, current, cluster_cpus))
            current = []
        current.append(stage)
    if current:
        steps.append(_group(pipeline, current, cluster_cpus))
    return steps


def step_of(steps: list[Optional[Group]], chain: list[str], index: int) -> int:
    """The step a unit entering at chain ``index`` starts in."""
    stage = chain[index]
    for position, step in enumerate(steps):
        if (step is None and stage == ENGINE) or (step is not None and stage != ENGINE and stage in step.stages):
            return position
    raise ValueError(f"stage {stage!r} is in no step of {chain}")


def unschedulable(
    steps: list[Optional[Group]], nodes: list[dict[str, float]], engines: Optional[dict[str, float]]
) -> Optional[str]:
    """Why this run could never be scheduled on these nodes (their total resources), if it could
    not: Ray would otherwise keep its tasks or actors pending forever. ``engines``: what the
    engine pool reserves in all (``CPU``, ``GPU``) and per replica (``CPU_each``, ``GPU_each``)."""
    largest = {key: max((node.get(key, 0.0) for node in nodes), default=0.0) for key in ("CPU", "GPU")}
    total = {key: sum(node.get(key, 0.0) for node in nodes) for key in ("CPU", "GPU")}
    if engines:
        for key in ("CPU", "GPU"):
            if engines[f"{key}_each"] > largest[key]:
                return (
                    f"each engine asks for {engines[f'{key}_each']:g} {_unit(key)}; "
                    f"the largest node of the Ray cluster has {largest[key]:g}"
                )
            if engines[key] > total[key]:
                return f"the engines ask for {engines[key]:g} {_unit(key)} in all; the Ray cluster has {total[key]:g}"
    held = engines["CPU"] if engines and len(nodes) == 1 else 0.0  # on one node the engines' CPUs are never free
    for step in steps:
        if step is None:
            continue
        need = float(step.options.get("num_cpus") or 0)
        if need > largest["CPU"] - held:
            stages = ", ".join(s for s in step.stages if s != ENGINE) or ENGINE
            beside = f", {held:g} of them held by the engines for the whole run" if held else ""
            return (
                f"stage(s) {stages} ask for {need:g} logical CPU(s) per task; "
                f"the largest node of the Ray cluster has {largest['CPU']:g}{beside}"
            )
    return None


def _unit(key: str) -> str:
    return "logical CPU(s)" if key == "CPU" else "GPU(s)"


def check_schedulable(name: str, steps: list[Optional[Group]], engines: Optional[dict[str, float]]) -> None:
    """Fail at once, naming the resource, when the cluster could never run a step or hold the
    engines (Ray would keep them pending forever)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problem = unschedulable(steps, nodes, engines)
    if problem:
        raise RuntimeError(
            f"{name}: this run cannot be scheduled: {problem}. Lower the setting or add resources (Ray's CPUs "
            "are logical: a local Ray has max(4, cores) of them unless RayDataResource(num_cpus=...) says)."
        )
