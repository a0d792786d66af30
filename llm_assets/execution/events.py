"""What a run yields to its Dagster step as it goes: each stage's partition as it is committed, each
stage once all its partitions are (or failed), and the error of a run whose partitions failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from llm_assets.execution.stats import PartitionStats


@dataclass
class StageDone:
    stage: str
    results: list[PartitionStats]  # of the partitions committed (or up to date), in the run's order
    usage: Optional[dict[str, Any]] = None  # the engine stage's: what its engines held, and where
    failed: list[str] = field(default_factory=list)  # partitions that failed before this stage committed them


@dataclass
class PartitionCommitted:
    stage: str
    stats: PartitionStats


Event = Optional[Union[PartitionCommitted, StageDone]]


class PartitionsFailed(RuntimeError):
    """Some partitions of a run failed (bad input files, rows a stage refused); every stage of the
    others is committed."""

    def __init__(self, failed: dict[str, Exception], total: int):
        self.failed = failed
        problems = "; ".join(f"[{partition}] {problem}" for partition, problem in failed.items())
        good = total - len(failed)
        super().__init__(
            f"{len(failed)} of {total} partition(s) failed"
            + (f" (the other {good} committed every stage)" if good else "")
            + f": {problems}"
        )
