"""Per-partition numbers of a stage: rows, tokens, errors, time, and where the output is.

Counted from each batch's output in the Ray task that wrote it (``batch_counts``), added up per
partition on the driver, and stored in the partition's manifest when it commits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from llm_assets.rows import ERROR_COLUMN, failed_mask


def _sum(column) -> int:
    return int(pc.sum(column).as_py() or 0)


SAMPLES_KEPT = 5
SAMPLE_CHARS = 160


def batch_summary(batch: pa.Table) -> dict[str, Any]:
    """What the asset page shows of a stage's output besides counts: its columns (name, Arrow type)
    and, where the batch has generated text, a few rows of prompt and text (error rows left out)."""
    summary: dict[str, Any] = {"columns": [[f.name, str(f.type)] for f in batch.schema]}
    if "generated_text" in batch.column_names:
        rows = batch.slice(0, 4 * SAMPLES_KEPT).to_pylist()
        summary["samples"] = [
            {"prompt": _clip(_asked(row)), "generated_text": _clip(row.get("generated_text"))}
            for row in rows
            if not row.get(ERROR_COLUMN)
        ][:SAMPLES_KEPT]
    return summary


def _asked(row: dict[str, Any]) -> Any:
    """What the row asked: its last chat message's text (the templated prompt starts with the
    same system text in every row), else its prompt."""
    messages = row.get("messages") or []
    return messages[-1].get("content") if messages and isinstance(messages[-1], dict) else row.get("prompt")


def _clip(text: Any) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 1] + "…"


def batch_counts(batch: pa.Table, count_columns: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Rows, input and generated tokens, and rows with an error, of one output batch; and under
    ``extra``, the sums of the columns an engine declares (``Engine.count_columns``: column -> name)."""
    names = batch.column_names
    counts = {"rows": batch.num_rows, "input_tokens": 0, "generated_tokens": 0, "errors": 0}
    if "num_input_tokens" in names:
        counts["input_tokens"] = _sum(batch.column("num_input_tokens"))
    elif "tokenized_prompt" in names:
        counts["input_tokens"] = _sum(pc.list_value_length(batch.column("tokenized_prompt")))
    if "num_generated_tokens" in names:
        counts["generated_tokens"] = _sum(batch.column("num_generated_tokens"))
    if ERROR_COLUMN in names:
        counts["errors"] = _sum(failed_mask(batch.column(ERROR_COLUMN)))
    extra = {name: _sum(batch.column(column)) for column, name in (count_columns or {}).items() if column in names}
    if extra:
        counts["extra"] = extra
    return counts


@dataclass
class PartitionStats:
    partition: str
    rows_in: int = 0
    rows_out: int = 0
    input_tokens: int = 0
    generated_tokens: int = 0
    errors: int = 0
    seconds: float = 0.0
    path: str = ""
    code_version: str = ""
    input: str = ""  # what it was computed from: the upstream commit's attempt, or the source file's fingerprint
    rows_resumed: int = 0  # rows kept from an interrupted attempt, not computed again
    rows_cached: int = 0  # rows answered from the response cache, not sent to the engine
    extra: dict = field(default_factory=dict)  # the engine's own counts (Engine.count_columns): retries, say
    skipped: bool = False  # already committed with the same code version and input: not recomputed
    columns: list = field(default_factory=list)  # [name, Arrow type] of the output
    samples: list = field(default_factory=list)  # a few {prompt, generated_text} rows, where the output has text
    started: float = field(default_factory=time.monotonic)

    def add(self, counts: dict[str, int]) -> None:
        self.rows_out += counts["rows"]
        self.input_tokens += counts["input_tokens"]
        self.generated_tokens += counts["generated_tokens"]
        self.errors += counts["errors"]
        for name, value in counts.get("extra", {}).items():
            self.extra[name] = self.extra.get(name, 0) + value
        if counts.get("columns") and not self.columns:
            self.columns = counts["columns"]
        self.samples = (self.samples + counts.get("samples", []))[:SAMPLES_KEPT]

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("started", "skipped")}

    @classmethod
    def from_manifest(cls, stats: dict[str, Any]) -> "PartitionStats":
        known = {k: v for k, v in stats.items() if k in cls.__dataclass_fields__}
        return cls(**known, skipped=True)


def operator_times(dataset) -> list[str]:
    """One line per Ray Data operator of a finished execution, from Ray Data's own stats: its
    tasks and how long each ran, on CPU and in the stage code: what tells a starved operator (far
    more wall time than CPU) from a busy one."""
    lines: list[str] = []
    for summary in _parents_first(dataset.get_stats_summary()):
        for op in summary.operators_stats:
            wall, cpu = op.wall_time, op.cpu_time
            if wall is None or not wall.count:
                continue
            line = (
                f"Ray Data {op.operator_name}: {wall.count} task(s); per task on average (longest): ran "
                f"{wall.mean:.3f} s ({wall.max:.1f} s)"
            )
            if cpu is not None:
                line += f", {cpu.mean:.3f} s of it on CPU"
            if op.output_num_rows is not None:
                line += f"; {op.output_num_rows.sum} rows out"
            lines.append(line)
    return lines


def _parents_first(summary) -> list:
    found = []
    for parent in summary.parents:
        found.extend(_parents_first(parent))
    return found + [summary]
