"""Postprocess: the user's row -> row function over the finished rows.

``sampling_params`` travels between stages as JSON text (rows may carry different keys); here it
becomes the dict it was again, so the function and the output see rows as they went in.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import pyarrow as pa

from llm_assets.rows import ERROR_COLUMN, rows_of, table_of
from llm_assets.stages.base import apply_row_fn

STAGE = "postprocess"


class PostprocessStage:
    """Apply ``fn(row) -> row``. As in ray.data.llm, a row an earlier stage marked as failed
    bypasses the function and comes out whole (every column it had, its error in
    ``__inference_error__``), and with ``should_continue_on_error`` every good row's output has
    ``__inference_error__`` set to "" (one schema for both kinds of rows)."""

    NEEDS: tuple[str, ...] = ()
    ADDS: tuple[str, ...] = ()  # whatever the user function returns
    USER_FN = "postprocess"
    PROCESSOR_KWARGS = ("should_continue_on_error",)

    def __init__(
        self, fn: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None, should_continue_on_error: bool = False
    ):
        self.fn = fn
        self.error_column = should_continue_on_error

    def __call__(self, batch: pa.Table) -> pa.Table:
        if (
            self.fn is None
            and not self.error_column
            and not {"sampling_params", "pooling_params"} & set(batch.column_names)
        ):
            return batch
        return table_of([self._one(row) for row in rows_of(batch)])

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        for name in ("sampling_params", "pooling_params"):
            if isinstance(row.get(name), str):
                row[name] = json.loads(row[name])
        if row.get(ERROR_COLUMN):
            return row
        out = row if self.fn is None else apply_row_fn(self.fn, row, STAGE)
        if self.error_column:
            out[ERROR_COLUMN] = ""
        return out
