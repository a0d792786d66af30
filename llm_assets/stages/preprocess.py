"""Preprocess: the user's row -> row function, then the checks every later stage relies on.

Runs first, on CPU, so a bad row fails here, before any engine starts. The checks are the
pipeline's (``LLMPipeline`` composes them: the task's, then the engine's): this stage knows no
task, engine or input format; it names the row of whatever check fails.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pyarrow as pa

from llm_assets.rows import ROW_ID, RowError, rows_of, table_of
from llm_assets.stages.base import apply_row_fn

STAGE = "preprocess"
RowFn = Callable[[dict[str, Any]], dict[str, Any]]


class PreprocessStage:
    """Apply ``fn(row) -> row`` over the input row (its other columns are kept), then
    ``check_row(row) -> row as stored`` (raising ValueError naming the field)."""

    NEEDS: tuple[str, ...] = ()  # whatever the input file has; the user function maps it
    ADDS = ("row_id", "messages|prompt|payload", "sampling_params")
    USER_FN = "preprocess"
    PROCESSOR_KWARGS = ("check_row",)

    def __init__(self, fn: Optional[RowFn] = None, check_row: Optional[RowFn] = None):
        self.fn = fn
        self.check_row = check_row

    def __call__(self, batch: pa.Table) -> pa.Table:
        return table_of([self._one(row) for row in rows_of(batch)])

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        row_id = row[ROW_ID]
        if self.fn is not None:
            # As ray.data.llm 2.60: the input row, updated with what the function returns (a
            # column the function does not return is carried through, to postprocess).
            row = {**row, **apply_row_fn(self.fn, row, STAGE)}
        if self.check_row is None:
            return row
        try:
            return self.check_row(row)
        except ValueError as exc:
            raise RowError(row_id, STAGE, str(exc)) from None
