"""The rows every stage, engine, source and export shares: the row id, the error a bad row
raises, the error column, and the helpers that read and write them on ``pyarrow.Table`` batches.

Stages take and return ``pyarrow.Table`` batches (Ray Data's ``batch_format="pyarrow"``): columns
a stage does not touch pass through zero-copy, and nested columns (``messages``) keep their types.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

# Stable id of a row from the input file to the last stage's output.
ROW_ID = "row_id"
# Set on a row whose request failed when should_continue_on_error=True ("Type: message"). As in
# ray.data.llm, the final output's good rows carry "" in it: null and "" both mean no error.
ERROR_COLUMN = "__inference_error__"
# The roles a chat message may have.
ROLES = {"system", "user", "assistant", "tool", "developer"}


class RowError(ValueError):
    """A row that a stage cannot process; the message names the row id and what was expected."""

    def __init__(self, row_id: Any, stage: str, problem: str):
        self.row_id, self.stage, self.problem = row_id, stage, problem
        super().__init__(f"{stage}: row {row_id!r}: {problem}")

    def __reduce__(self):
        # Rebuilt from its own arguments: raised in a Ray worker, it reaches the driver as itself
        # (the default pickling passes only the message and fails to rebuild it).
        return (type(self), (self.row_id, self.stage, self.problem))


def rows_of(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def table_of(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows to a table with the union of their keys (``Table.from_pylist`` keeps only the first
    row's keys, silently dropping fields that later rows add)."""
    names = list(dict.fromkeys(key for row in rows for key in row))
    return pa.table({name: [row.get(name) for row in rows] for name in names})


def with_column(batch: pa.Table, name: str, values: Iterable[Any], type_: pa.DataType | None = None) -> pa.Table:
    """Add or replace one column, leaving the others untouched."""
    column = pa.array(list(values), type=type_)
    index = batch.schema.get_field_index(name)
    if index >= 0:
        return batch.set_column(index, name, column)
    return batch.append_column(name, column)


def column_or_none(batch: pa.Table, name: str) -> list[Any]:
    if name in batch.column_names:
        return batch.column(name).to_pylist()
    return [None] * batch.num_rows


def ok_rows(batch: pa.Table) -> list[bool]:
    """Rows that an earlier stage did not mark as failed; failed rows pass through untouched."""
    return [not error for error in column_or_none(batch, ERROR_COLUMN)]


def failed_mask(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where an error column holds an error (not null, not "")."""
    return pc.fill_null(pc.not_equal(column, ""), False)


def dumps_params(params: Any) -> str | None:
    """Sampling params are stored as a JSON string: rows may carry different keys, and one Parquet
    schema per partition cannot hold structs that differ from batch to batch."""
    if params is None:
        return None
    expected = 'expected a dict of sampling settings ({"max_tokens": 64, ...}) or its JSON text'
    if isinstance(params, str):
        try:
            decoded = json.loads(params)  # already JSON: validate, keep as is
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            raise ValueError(f"is the text {params[:80]!r}: {expected}") from None
        return params
    if not isinstance(params, dict):
        raise TypeError(f"is {type(params).__name__} {str(params)[:80]!r}: {expected}")
    return json.dumps(params, sort_keys=True)


def loads_params(params: str | None) -> dict[str, Any]:
    if params is None:
        return {}
    return {key: value for key, value in json.loads(params).items() if value is not None}
