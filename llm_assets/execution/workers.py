"""Stage workers: long-lived Ray actors for a group whose stages load something (a tokenizer), as
ray.data.llm runs its tokenizer stages on an actor pool.

As plain Ray tasks, a group's units run on whatever worker Ray picks: one that has only run
Preprocess loads the tokenizer when a Tokenize unit lands on it, which takes seconds on a busy host,
and near a run's end the engines wait for it (the 4-GPU H100 machine, docs/benchmarks.md sitting 13:
the last partitions' tokenizer tasks took 17-22 s while both engines idled). A stage worker loads
its stages once, on its first unit, and keeps them for the run.

Workers are created as units need them, up to the group's tasks in flight, and only while the
cluster keeps room for a plain task beside what the engines and all stage workers hold for the
whole run; a group without room runs its units as plain tasks, as before. A worker that dies (its
process killed, its node lost) is dropped and its unit runs again as a plain task (with Ray's
retries, so a unit that kills every process it runs in fails the run). All are killed when the
chain is done.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from llm_assets.execution.units import run_unit

class StageWorker:
    """The actor: runs units of one group's stages; the tokenizer they load stays in its process."""

    def run(self, *args: Any):
        return run_unit(*args)


class StageWorkers:
    def __init__(self, label: str, options: dict[str, Any]):
        self.label = label
        self.actor_options = {k: v for k, v in options.items() if k != "num_returns"}
        self.cpus = float(options.get("num_cpus") or 0)
        self.started: list = []
        self.idle: list = []
        self.losses = 0
        self.created = 0

    def take(self, room: Callable[[float], bool]) -> Optional[Any]:
        """An idle worker, or a new one while ``room(cpus)`` says the cluster keeps room for it;
        None: run the unit as a plain task."""
        import ray

        if self.idle:
            return self.idle.pop(0)  # the longest idle: every worker keeps getting units
        if not room(self.cpus):
            return None
        worker = ray.remote(StageWorker).options(**self.actor_options, max_restarts=0).remote()
        self.started.append(worker)
        self.created += 1
        return worker

    def call(self, worker, *args: Any):
        return worker.run.options(num_returns=2).remote(*args)

    def done(self, worker) -> None:
        self.idle.append(worker)

    def lost(self, worker) -> None:
        """A worker died with a unit (the caller runs the unit again as a plain task)."""
        self.started.remove(worker)
        self.losses += 1

    def held_cpus(self) -> float:
        return self.cpus * len(self.started)

    def stop(self) -> None:
        import ray

        for worker in self.started:
            ray.kill(worker, no_restart=True)
        self.started, self.idle = [], []


def room_for_worker(steps: list, cluster_cpus: float, engine_cpus: float) -> Callable[[float], bool]:
    """Whether one more stage worker (holding ``cpus`` for the run) leaves room for a plain task of
    any group beside what the engines and all stage workers hold: no step ever waits for CPUs that
    idle workers keep."""
    groups = [step for step in steps if step is not None]

    def room(cpus: float) -> bool:
        held = engine_cpus + sum(step.workers.held_cpus() for step in groups if step.workers)
        task = max(float(step.options.get("num_cpus") or 0) for step in groups)
        return cluster_cpus - held - cpus >= task

    return room


def stop_workers(steps: list) -> None:
    for step in steps:
        if step is not None and step.workers is not None:
            step.workers.stop()
