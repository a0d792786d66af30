"""Ray workers for the CPU stages after the engine, started while the engines build.

The groups after the engine (Detokenize, Postprocess, writing the engine's output) get their first
unit only once an engine is ready. Without a warm-up, each of their first tasks then starts a Ray
worker process and loads the tokenizer in it, beside engines that are generating: on a 32-core GPU
host, two engines had generated all 10 000 rows 13 s after they were ready, but the engine stage's
last partition committed 44 s after, its writers' first 8 tasks taking up to 20 s each to load the
tokenizer (docs/benchmarks.md, sitting 15). While the engines build (tens of seconds),
one warm-up task per task slot of such a group builds the group's stages in a worker of the group's
own runtime_env; Ray then gives the group's tasks those idle workers. The group's tasks wait for
warm-ups still under way: those workers started before any new one would.

Ray keeps idle workers only up to the node's CPU count (its worker soft limit) and kills the rest
within a second, warmed ones included; so the warm-up is skipped when the run's task slots and
engines do not fit the cluster's CPUs (a 2-core machine), where it would only take cores from the
engine build.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from llm_assets.execution.steps import Group
from llm_assets.execution.units import size_tokenizer_threads
from llm_assets.secret_env import applied as secret_env_applied


def build_stages(stages: list[tuple[type, dict[str, Any]]], secret_env: dict[str, str]) -> float:
    """The Ray task: build each stage (a UDF class and its kwargs) once; the stages cache what
    they load per process. Returns the seconds it took."""
    started = time.monotonic()
    size_tokenizer_threads()
    with secret_env_applied(secret_env):
        for udf, kwargs in stages:
            udf(**kwargs)
    return time.monotonic() - started


class Warmup:
    def __init__(self, steps: list[Optional[Group]], cluster_cpus: float, log: Callable[[str], None], name: str):
        # None in the steps is the engine; the groups after it wait for its first output.
        self.groups = [group for group in steps[steps.index(None) + 1 :] if group is not None] if None in steps else []
        self.slots = sum(step.max_in_flight for step in steps if step is not None)
        self.cluster_cpus, self.log, self.name = cluster_cpus, log, name
        self.started = False
        self.pending: dict[Any, Group] = {}  # warm-up task ref -> its group
        self.seconds: dict[str, list[float]] = {}

    def start(self, engines: int, stages_of: Callable[[Group], list[tuple[type, dict]]]) -> None:
        """Once, when the engines begin to build: one warm-up task per task slot of each group
        after the engine, if the run's workers fit the cluster's CPUs."""
        if self.started:
            return
        self.started = True
        if not self.groups or self.slots + engines > self.cluster_cpus:
            return
        import ray

        remote = ray.remote(build_stages)
        for group in self.groups:
            options = {**group.options, "num_returns": 1}
            stages = stages_of(group)
            for _ in range(group.max_in_flight):
                self.pending[remote.options(**options).remote(stages, group.secret_env)] = group
            self.log(
                f"{self.name}: starting {group.max_in_flight} Ray worker(s) for {group.label()} while the engines build"
            )

    def warming(self, group: Group) -> bool:
        """Whether the group's workers are still warming: its tasks wait for them, as they started
        before any new worker would."""
        return any(g is group for g in self.pending.values())

    def settle(self, ref) -> None:
        import ray

        group = self.pending.pop(ref)
        label = group.label()
        took = self.seconds.setdefault(label, [])
        try:
            took.append(ray.get(ref))
        except ray.exceptions.RayError as exc:  # its tasks build the stages themselves, and fail there if they must
            self.log(f"{self.name}: a warm-up of {label} failed; its tasks will build the stages themselves: {exc}")
        if took and not self.warming(group):
            self.log(
                f"{self.name}: {len(took)} Ray worker(s) for {label} ready, "
                f"their stages built in {max(took):.1f} s at most"
            )

    def cancel(self) -> None:
        import ray

        for ref in self.pending:
            ray.cancel(ref)
