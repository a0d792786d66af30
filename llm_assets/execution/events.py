"""What a streaming run yields to its Dagster step: a partition committed, a stage done (with what
its engines held), and the error for partitions that failed while the others committed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from llm_assets.execution.stats import PartitionStats


@dataclass
class StageDone:
    stage: str
    results: list[PartitionStats]  # of the partitions committed (or up to date), in the run's order
    usage: Optional[dict[str, Any]] = None  # the engine stage's: what its engines held, and where (EnginePool.usage)
    failed: list[str] = field(default_factory=list)  # partitions that failed before this stage committed them


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


@dataclass
class PartitionCommitted:
    stage: str
    stats: PartitionStats


Event = Optional[Union[PartitionCommitted, StageDone]]
