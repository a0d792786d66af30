"""Asset checks, evaluated over the partitions a run materialized:

- ``row_ids_conserved`` (every stage): each input row id appears exactly once in the stage's
  output, error rows included;
- ``error_rate`` (engine): rows with ``__inference_error__`` / rows, at most the pipeline's
  ``max_error_rate``;
- ``generations_not_empty`` (the first stage with ``generated_text``): no row without an error
  has an empty generation.

Each reads only the columns it needs from the committed Parquet.
"""

from __future__ import annotations

from collections import Counter
import dagster as dg
import pyarrow.compute as pc

from llm_assets.pipeline import LLMPipeline
from llm_assets.tasks import ENGINE
from llm_assets.stages.base import ERROR_COLUMN, ROW_ID

ROW_IDS = "row_ids_conserved"
ERROR_RATE = "error_rate"
NOT_EMPTY = "generations_not_empty"
LISTED = 20  # row ids / partitions named in a failing check's metadata, at most


def check_specs(pipeline: LLMPipeline, stage: str, asset_key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    specs = [dg.AssetCheckSpec(ROW_IDS, asset=asset_key, description="Every input row id appears exactly once in this stage's output (error rows included).")]
    if stage == ENGINE:
        specs.append(dg.AssetCheckSpec(ERROR_RATE, asset=asset_key, description=f"Rows with an inference error are at most {pipeline.max_error_rate:.1%} of the rows."))
    if stage == pipeline.text_stage():
        specs.append(dg.AssetCheckSpec(NOT_EMPTY, asset=asset_key, description="No row without an error has an empty generated_text."))
    return specs


def _row_ids(storage, pipeline: str, stage: str, partition: str) -> Counter:
    ids: Counter = Counter()
    for table in storage.read_committed(pipeline, stage, partition, [ROW_ID]):
        ids.update(table.column(ROW_ID).to_pylist())
    return ids


def row_ids_conserved(pipeline: LLMPipeline, stage: str, partitions: list[str], storage, rows_in: dict[str, int], asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    upstream = pipeline.plan(stage).upstream
    duplicates, missing, extra, failing = [], [], [], []
    for partition in partitions:
        out = _row_ids(storage, pipeline.name, stage, partition)
        dup = [row_id for row_id, n in out.items() if n > 1]
        if upstream is None:  # against the source: as many distinct ids as rows read
            gone = [] if len(out) == rows_in[partition] else [f"{rows_in[partition] - len(out)} row(s)"]
            new: list = []
        else:
            expected = _row_ids(storage, pipeline.name, upstream, partition)
            gone = sorted(set(expected) - set(out))
            new = sorted(set(out) - set(expected))
        if dup or gone or new:
            failing.append(partition)
        duplicates += dup
        missing += gone
        extra += new
    return dg.AssetCheckResult(
        check_name=ROW_IDS,
        asset_key=asset_key,
        passed=not failing,
        metadata={
            "partitions_checked": len(partitions),
            "duplicate_row_ids": len(duplicates),
            "missing_row_ids": len(missing),
            "unexpected_row_ids": len(extra),
            "failing_partitions": ", ".join(failing[:LISTED]),
            "examples": ", ".join(map(str, (duplicates + missing + extra)[:LISTED])),
        },
    )


def error_rate(pipeline: LLMPipeline, rows: int, errors: int, asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    rate = errors / rows if rows else 0.0
    return dg.AssetCheckResult(
        check_name=ERROR_RATE,
        asset_key=asset_key,
        passed=rate <= pipeline.max_error_rate,
        metadata={"error_rate": round(rate, 6), "errors": errors, "rows": rows, "max_error_rate": pipeline.max_error_rate},
    )


def generations_not_empty(pipeline: LLMPipeline, stage: str, partitions: list[str], storage, asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    empty: list[str] = []
    checked = 0
    for partition in partitions:
        for table in storage.read_committed(pipeline.name, stage, partition, [ROW_ID, "generated_text", ERROR_COLUMN]):
            if "generated_text" not in table.column_names:
                continue
            ok = pc.is_null(table.column(ERROR_COLUMN)) if ERROR_COLUMN in table.column_names else None
            text = pc.utf8_trim_whitespace(pc.fill_null(table.column("generated_text"), ""))
            is_empty = pc.equal(pc.utf8_length(text), 0)
            if ok is not None:
                is_empty = pc.and_(is_empty, ok)
            checked += table.num_rows
            empty += table.filter(is_empty).column(ROW_ID).to_pylist()
    return dg.AssetCheckResult(
        check_name=NOT_EMPTY,
        asset_key=asset_key,
        passed=not empty,
        metadata={"rows_checked": checked, "empty_generations": len(empty), "examples": ", ".join(map(str, empty[:LISTED]))},
    )
