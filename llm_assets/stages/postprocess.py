"""Postprocess: the user's row -> row function over the finished rows."""

from __future__ import annotations

from typing import Any, Callable, Optional

import pyarrow as pa

from llm_assets.stages.base import ERROR_COLUMN, ROW_ID, RowError, rows_of, table_of

STAGE = "postprocess"


class PostprocessStage:
    """Apply ``fn(row) -> row``; rows an earlier stage marked as failed pass through untouched."""

    def __init__(self, fn: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None):
        self.fn = fn

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fn is None:
            return batch
        return table_of([self._one(row) for row in rows_of(batch)])

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        row_id = row[ROW_ID]
        if row.get(ERROR_COLUMN) is not None:
            return row
        try:
            out = self.fn(dict(row))
        except Exception as exc:
            raise RowError(row_id, STAGE, f"the postprocess function raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, dict):
            raise RowError(row_id, STAGE, f"the postprocess function returned {type(out).__name__}, expected a dict")
        out[ROW_ID] = row_id
        return out
