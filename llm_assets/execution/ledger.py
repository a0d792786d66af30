"""The run's ledger: what the stages of a Ray Data run have written, which partitions failed, and
what the engines are doing, kept in one small Ray actor that the run's process reads.

Ray Data moves the rows; each stage's Parquet files are written by the map tasks themselves (the
rows never come back to the run's process), so each task tells the ledger what it wrote (stage,
partition, file, rows, counts) before it hands its batch on; once a stage's files of a
partition hold every row of it, the ledger hands them to the run, which commits that stage. A task that finds a bad row
fails that row's partition here and drops the partition's rows; the run commits the others. The
engine actors report their state (importing, building, ready, dead, shut down) and their
batches, which the run's progress lines and stall reports show.
"""

from __future__ import annotations

import time
from typing import Any, Optional

ENGINE = "engine"  # as llm_assets.tasks names it (this module imports nothing of the library)


class RunLedger:
    """A Ray actor (``num_cpus=0``): every call is short and the run's tasks wait for its answer."""

    def __init__(self):
        self.files: dict[tuple[str, str], dict[str, dict]] = {}  # (stage, partition) -> file name -> its record
        self.rows: dict[tuple[str, str], int] = {}  # (stage, partition) -> rows in its files
        # partition -> stage -> the rows its files will hold, in chain order; a stage is handed to
        # the run for its commit once its files hold them all and every stage before it was handed.
        self.expected: dict[str, dict[str, int]] = {}
        self.handed: set[tuple[str, str]] = set()
        self.failed: dict[str, BaseException] = {}  # partition -> the first error that failed it
        self.failed_order: list[str] = []
        # Partitions with a row the response cache did not answer, in a run started without
        # engines (the cache answered a sample of every row): the run takes them again with engines.
        self.deferred: set[str] = set()
        self.engines: dict[str, dict[str, Any]] = {}  # engine actor id -> its latest state
        self.engine_rows = 0
        self.execution_done = False  # the run's Ray Data execution is over: engines shut down
        self.engine_builds = 0  # engines that became ready (a restarted actor builds again)
        self.last_progress = time.time()

    def expect(self, expected: dict[str, dict[str, int]]) -> None:
        self.expected.update(expected)

    def wrote(self, records: list[dict[str, Any]]) -> set[str]:
        """Files a task wrote (a retried task writes the same names again: kept once); returns
        the partitions failed so far, whose rows the task's worker drops from then on."""
        for record in records:
            key = (record["stage"], record["partition"])
            files = self.files.setdefault(key, {})
            previous = files.get(record["file"])
            self.rows[key] = self.rows.get(key, 0) + record["rows"] - (previous["rows"] if previous else 0)
            files[record["file"]] = record
        self.last_progress = time.time()
        return set(self.failed)

    def complete(self) -> list[tuple[str, str, list[dict[str, Any]]]]:
        """(partition, stage, its files' records) of each stage whose files now hold every row it
        expects, in chain order per partition; each is handed once (forgotten here)."""
        handed = []
        for partition, stages in self.expected.items():
            stop = ENGINE if partition in self.deferred else None
            if partition in self.failed:
                stop = getattr(self.failed[partition], "stage", None) or "*"  # "*": no stage (an unreadable file)
            for stage, rows in stages.items():
                if stop == "*" or stage == stop:
                    break
                key = (stage, partition)
                if key in self.handed:
                    continue
                if self.rows.get(key, 0) < rows:
                    break
                self.handed.add(key)
                handed.append((partition, stage, list(self.files.pop(key, {}).values())))
        return handed

    def unfinished(self) -> list[str]:
        """Partitions with a stage not handed yet (not failed, not deferred)."""
        return [
            partition
            for partition, stages in self.expected.items()
            if partition not in self.failed
            and partition not in self.deferred
            and any((stage, partition) not in self.handed for stage in stages)
        ]

    def fail(self, partition: str, error: BaseException) -> None:
        """Fail a partition: the stages before the one that failed it still commit once complete
        (their files hold every row), nothing from that stage on."""
        if partition not in self.failed:
            self.failed[partition] = error
            self.failed_order.append(partition)

    def defer(self, partitions: list[str]) -> None:
        self.deferred.update(partitions)

    def deferrals(self) -> list[str]:
        return sorted(self.deferred)

    def failures(self, since: int = 0) -> list[tuple[str, BaseException]]:
        """Partitions failed since the first ``since`` ones, in order, with their error."""
        return [(partition, self.failed[partition]) for partition in self.failed_order[since:]]

    def engine(self, actor_id: str, state: dict[str, Any]) -> None:
        previous = self.engines.get(actor_id, {"created": time.time()})
        if state.get("state") == "shut down":
            state = {**state, "ended": time.time()}
        if state.get("state") == "ready":
            self.engine_builds += 1
        if state.get("state") == "importing" and previous.get("state") in ("dead", "ready"):
            # Ray restarted the actor: the batches its last process had begun, Ray Data sends again.
            lost = previous.get("started", 0) - previous.get("batches", 0)
            state = {**state, "restarts": previous.get("restarts", 0) + 1, "lost_batches": lost}
            state["started"] = previous.get("batches", 0)
        self.engines[actor_id] = {**previous, **state}
        self.last_progress = time.time()

    def finish(self) -> None:
        self.execution_done = True

    def done(self) -> bool:
        return self.execution_done

    def started(self, actor_id: str) -> None:
        engine = self.engines.setdefault(actor_id, {})
        engine["started"] = engine.get("started", 0) + 1

    def batch(self, actor_id: str, rows: int, seconds: float, report: Optional[dict] = None) -> set[str]:
        engine = self.engines.setdefault(actor_id, {})
        if report is not None:
            engine["report"] = report
        engine["rows"] = engine.get("rows", 0) + rows
        engine["batches"] = engine.get("batches", 0) + 1
        self.engine_rows += rows
        self.last_progress = time.time()
        return set(self.failed)

    def snapshot(self) -> dict[str, Any]:
        """What the run's process shows: the engines, the rows they finished, the last progress."""
        return {
            "engines": {actor: dict(state) for actor, state in self.engines.items()},
            "engine_rows": self.engine_rows,
            "engine_builds": self.engine_builds,
            "last_progress": self.last_progress,
        }


def start_ledger():
    """A new ledger actor for one run (owned by the run's process: it ends with it), on the run's
    own node: a worker node lost mid-run must not take the run's bookkeeping with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(RunLedger).options(num_cpus=0, scheduling_strategy=here).remote()
