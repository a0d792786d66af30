"""What a streaming run has written, per stage and partition, and the commits that make it visible.

Each (stage, partition) the run computes gets an attempt folder (created when its first unit is
sent, so a run that fails early writes nothing), collects the files its units' tasks wrote, and
is committed (manifest last) as soon as the partition's input is fully read and every unit it
expects is written. Stages commit in chain order, so a stage never commits before its upstream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from llm_assets.execution.inputs import Entry, Unit, input_identity
from llm_assets.execution.stats import PartitionStats
from llm_assets.storage import new_attempt_name
from llm_assets.tasks import ENGINE


@dataclass
class Commit:
    """One stage's output of one partition, being written."""

    attempt: str
    stats: PartitionStats
    files: dict  # unit seq -> (file name, rows)
    expected: int = 0
    info: Optional[dict] = None  # recorded in the attempt folder (the engine's, for resuming)
    created: bool = False  # its folder exists


class Commits:
    def __init__(
        self,
        pipeline,
        chain: list[str],
        storage,
        versions: dict[str, str],
        partitions: list[str],
        log: Callable[[str], None],
    ):
        self.pipeline, self.chain, self.storage, self.versions, self.partitions, self.log = (
            pipeline,
            chain,
            storage,
            versions,
            partitions,
            log,
        )
        self.open_commits: dict[tuple[str, str], Commit] = {}
        self.results: dict[str, dict[str, PartitionStats]] = {stage: {} for stage in chain}
        self.fed: set[str] = set()  # partitions whose input is fully read
        self.reported: set[str] = set()
        self.just_committed: list[tuple[str, PartitionStats]] = []  # since the last drain
        self.to_commit = dict.fromkeys(chain, 0)  # partitions each stage computes in this run
        self.committed = dict.fromkeys(chain, 0)
        # Partitions that failed (a bad input file, a row a stage refused) -> the first problem:
        # none of their stages commits after that; the other partitions go on.
        self.failed: dict[str, Exception] = {}

    def fail(self, partition: str, problem: Exception) -> None:
        """Fail one partition: what it committed stays, nothing more of it is committed."""
        if partition in self.failed:
            return
        self.failed[partition] = problem
        others = len(self.partitions) - len(self.failed)
        self.log(
            f"[{partition}] failed: {problem}"
            + (f" (the run goes on with the other {others} partition(s))" if others else "")
        )

    def keep(self, entry: Entry) -> None:
        """Record the partition's up-to-date stages, and count the ones this run computes."""
        for stage, stats in entry.kept.items():
            self.results[stage][entry.partition] = stats
        if entry.index is not None:
            for stage in self.chain[entry.index :]:
                self.to_commit[stage] += 1

    def open(self, entry: Entry) -> None:
        """Name the partition's attempts for every stage it computes (the engine's may be adopted)."""
        upstream_attempt = None
        for stage in self.chain[entry.index :]:
            # The entry stage's input was found when the partition was planned; a source file that
            # could not be read then is read again here, failing with its own message.
            identity = (
                upstream_attempt or entry.input or input_identity(self.pipeline, stage, entry.partition, self.storage)
            )
            stats = PartitionStats(entry.partition, code_version=self.versions[stage], input=identity)
            if stage == ENGINE and entry.resumed is not None:
                attempt, names, rows = entry.resumed
                files, created = dict(enumerate(zip(names, rows))), True
                total = entry.upstream.rows
                self.log(
                    f"engine [{entry.partition}]: resuming an interrupted attempt ({attempt}): "
                    f"{sum(rows)} of {total} rows "
                    f"already written are kept; the other {total - sum(rows)} go to the engine"
                )
            else:
                attempt, files, created = new_attempt_name(), {}, False
            info = {"code_version": self.versions[stage], "input": identity} if stage == ENGINE else None
            self.open_commits[(stage, entry.partition)] = Commit(attempt, stats, files, len(files), info, created)
            upstream_attempt = attempt

    def target(self, stage: str, partition: str) -> tuple[str, str]:
        """Where a unit's output of ``stage`` goes: the partition folder and the attempt."""
        commit = self.open_commits[(stage, partition)]
        if not commit.created:
            self.storage.create_attempt(self.pipeline.name, stage, partition, commit.attempt, commit.info)
            commit.created = True
        return self.storage.partition_dir(self.pipeline.name, stage, partition), commit.attempt

    def expect(self, unit: Unit) -> None:
        for stage in self.chain[unit.entry :]:
            if not (stage == ENGINE and unit.after_engine):
                self.open_commits[(stage, unit.partition)].expected += 1

    def written(self, unit: Unit, items: list[dict]) -> None:
        for item in items:
            commit = self.open_commits[(item["stage"], unit.partition)]
            commit.files[unit.seq] = (item["file"], item["rows"])
            commit.stats.add(item)

    def add_cached(self, partition: str, rows: int, tokens: int) -> None:
        """Rows the response cache answered: counted apart, and their tokens are not this run's
        generated tokens (the engine stage's output holds them all)."""
        stats = self.open_commits[(ENGINE, partition)].stats
        stats.rows_cached += rows
        stats.generated_tokens -= tokens

    def input_read(self, entry: Entry) -> None:
        for stage in self.chain[entry.index :]:
            self.open_commits[(stage, entry.partition)].stats.rows_in = entry.rows
        if entry.resumed is not None:
            engine = self.open_commits[(ENGINE, entry.partition)].stats
            engine.add(entry.resumed_stats)
            engine.rows_resumed = entry.resumed_stats["rows"]
        self.fed.add(entry.partition)
        self.commit_ready(entry.partition)

    def commit_ready(self, partition: str) -> None:
        if partition not in self.fed or partition in self.failed:
            return
        for stage in self.chain:
            commit = self.open_commits.get((stage, partition))
            if commit is None or partition in self.results[stage] or len(commit.files) < commit.expected:
                continue
            names = [commit.files[seq] for seq in sorted(commit.files)]
            stats = commit.stats
            stats.seconds = round(time.monotonic() - stats.started, 3)
            stats.path = self.storage.uri(self.storage.partition_dir(self.pipeline.name, stage, partition))
            self.storage.commit(
                self.pipeline.name,
                stage,
                partition,
                commit.attempt,
                [n for n, _ in names],
                [r for _, r in names],
                stats.as_dict(),
            )
            self.results[stage][partition] = stats
            self.committed[stage] += 1
            self.just_committed.append((stage, stats))
            done, total = self.counts(stage)
            cached = f", {stats.rows_cached} of them answered from the response cache" if stats.rows_cached else ""
            self.log(
                f"{stage} [{partition}]: committed {stats.rows_out} rows in {stats.seconds:.1f} s{cached} "
                f"({done}/{total} partitions) -> {stats.path}"
            )

    def counts(self, stage: str) -> tuple[int, int]:
        """Partitions of the stage committed by this run, and to commit in all."""
        return self.committed[stage], self.to_commit[stage]

    def drain_committed(self) -> list[tuple[str, PartitionStats]]:
        """(stage, stats) of each partition committed since the last call."""
        drained, self.just_committed = self.just_committed, []
        return drained

    def newly_finished(self) -> list[str]:
        """Stages whose every partition is now committed (or was up to date) or failed, once each."""
        finished = [
            s
            for s in self.chain
            if s not in self.reported and all(p in self.results[s] or p in self.failed for p in self.partitions)
        ]
        self.reported.update(finished)
        return finished

    def summary(self) -> str:
        return ", ".join("{} {}/{}".format(stage, *self.counts(stage)) for stage in self.chain)
