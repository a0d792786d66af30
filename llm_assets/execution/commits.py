"""The commits that make a run's output visible, per stage and partition.

Each (stage, partition) the run computes gets an attempt folder, created by the worker that
writes its first file (a run that fails on its checks writes nothing). Ray Data's tasks write their
files into it and tell the run's ledger; once every row of a partition has come out of the chain,
each of its stages is committed (manifest last), in chain order, so a stage never commits before
its upstream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from llm_assets.execution.plan import Entry, input_identity
from llm_assets.execution.reads import file_position
from llm_assets.execution.stats import PartitionStats
from llm_assets.storage import new_attempt_name
from llm_assets.tasks import ENGINE


@dataclass
class Commit:
    """One stage's output of one partition, being written."""

    attempt: str
    stats: PartitionStats
    kept: list  # (file name, rows, first row id) of a resumed attempt's files
    info: Optional[dict] = None  # recorded in the attempt folder (the engine's, for resuming)


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

    def open(self, entry: Entry) -> tuple[dict[tuple[str, str], str], dict[str, dict]]:
        """Name the partition's attempt folders for every stage it computes (the engine's may be
        adopted): returns each one's full path, and what the new engine attempt records (the
        workers create a folder with its first file: a run that fails first writes nothing)."""
        upstream_attempt, folders, infos = None, {}, {}
        for stage in self.chain[entry.index :]:
            # The entry stage's input was found when the partition was planned; a source file that
            # could not be read then is read again here, failing with its own message.
            identity = (
                upstream_attempt or entry.input or input_identity(self.pipeline, stage, entry.partition, self.storage)
            )
            stats = PartitionStats(entry.partition, code_version=self.versions[stage], input=identity)
            info = {"code_version": self.versions[stage], "input": identity} if stage == ENGINE else None
            kept: list = []
            if stage == ENGINE and entry.resumed is not None:
                attempt, names, rows = entry.resumed
                kept = [(name, count, None) for name, count in zip(names, rows)]
                total = entry.upstream.rows
                self.log(
                    f"engine [{entry.partition}]: resuming an interrupted attempt ({attempt}): "
                    f"{sum(rows)} of {total} rows "
                    f"already written are kept; the other {total - sum(rows)} go to the engine"
                )
            else:
                attempt = new_attempt_name()
            self.open_commits[(stage, entry.partition)] = Commit(attempt, stats, kept, info)
            folder = f"{self.storage.partition_dir(self.pipeline.name, stage, entry.partition)}/{attempt}"
            folders[(stage, entry.partition)] = folder
            if info is not None and not kept:
                infos[folder] = info
            upstream_attempt = attempt
        return folders, infos

    def commit(self, entry: Entry, stage: str, records: list[dict]) -> None:
        """The partition's output of one stage, from the records of the files its tasks wrote."""
        partition = entry.partition
        commit = self.open_commits.pop((stage, partition))
        stats = commit.stats
        stats.rows_in = entry.rows
        for record in records:
            stats.add(record)
            stats.rows_cached += record.get("cached", 0)
            stats.generated_tokens -= record.get("cached_tokens", 0)
        if commit.kept:
            stats.add(entry.resumed_stats)
            stats.rows_resumed = entry.resumed_stats["rows"]
        # In the input's order (files are named by their first row's position), kept files included.
        files = sorted(
            commit.kept + [(r["file"], r["rows"], r["first"]) for r in records], key=lambda f: file_position(f[0])
        )
        stats.seconds = round(time.monotonic() - stats.started, 3)
        stats.path = self.storage.uri(self.storage.partition_dir(self.pipeline.name, stage, partition))
        self.storage.commit(
            self.pipeline.name,
            stage,
            partition,
            commit.attempt,
            [name for name, _, _ in files],
            [rows for _, rows, _ in files],
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

    def expected_rows(self, entry: Entry) -> dict[str, int]:
        """The rows each stage the partition computes will write, in chain order (a resumed
        engine attempt's kept rows are written already)."""
        kept = entry.resumed_stats.get("rows", 0) if entry.resumed is not None else 0
        return {stage: entry.rows - (kept if stage == ENGINE else 0) for stage in self.chain[entry.index :]}

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
