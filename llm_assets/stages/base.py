"""What every stage shares beyond the row contract (``llm_assets/rows.py``): applying a user's
row function with errors that name the row."""

from __future__ import annotations

from typing import Any, Callable

from llm_assets.rows import ROW_ID, RowError


def apply_row_fn(fn: Callable[[dict[str, Any]], Any], row: dict[str, Any], stage: str) -> dict[str, Any]:
    """Call a user's row -> row function; errors name the row. The row id survives whatever the
    function returns."""
    row_id = row[ROW_ID]
    try:
        out = fn(dict(row))
    except Exception as exc:
        raise RowError(row_id, stage, f"the {stage} function raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, dict):
        raise RowError(row_id, stage, f"the {stage} function returned {type(out).__name__}, expected a dict")
    out[ROW_ID] = row_id
    return out
