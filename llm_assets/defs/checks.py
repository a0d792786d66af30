"""Asset checks, evaluated over the partitions a run materialized:

- ``row_ids_conserved`` (every stage): each input row id appears exactly once in the stage's
  output, error rows included;
- ``error_rate`` (engine): rows with ``__inference_error__`` / rows, at most the pipeline's
  ``max_error_rate``;
- ``generations_not_empty`` (the first stage with ``generated_text``, tasks that generate text):
  no row without an error has an empty generation;
- ``embeddings_valid`` (engine, tasks that write ``embeddings``: embed, classify): every row without an error has an
  embedding, all of one dimension, none with NaN;
- ``schema_valid`` (the same stage, for a pipeline with an ``output_schema``): rows whose text does
  not parse as the schema's model are at most ``max_error_rate`` of the rows without an error;
- ``media_readable`` (prepare_multimodal): rows whose media could not be read or decoded, or that
  the model refuses, are at most ``max_error_rate`` of the rows with media (such rows are kept only
  with ``should_continue_on_error``; without it the first one fails its partition); the metadata
  counts the media by modality and the bytes stored inline.

Each partition is checked as soon as the run commits it (``partition_findings``, in a thread
beside the stream, reading only the columns it needs from the committed Parquet); a stage's
results (``stage_results``) add up its partitions' findings when the stage is done, so a run over
many partitions does not read them all again at its end.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from llm_assets.execution.stats import PartitionStats
from llm_assets.pipeline import LLMPipeline
from llm_assets.rows import ERROR_COLUMN, ROW_ID, failed_mask, loads_params
from llm_assets.stages import media, prepare_multimodal
from llm_assets.tasks import ENGINE

ROW_IDS = "row_ids_conserved"
ERROR_RATE = "error_rate"
NOT_EMPTY = "generations_not_empty"
SCHEMA_VALID = "schema_valid"
EMBEDDINGS = "embeddings_valid"
MEDIA = "media_readable"
LISTED = 20  # row ids / partitions named in a failing check's metadata, at most


def check_specs(pipeline: LLMPipeline, stage: str, asset_key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    specs = [
        dg.AssetCheckSpec(
            ROW_IDS,
            asset=asset_key,
            description="Every input row id appears exactly once in this stage's output (error rows included).",
        )
    ]
    if stage == ENGINE:
        specs.append(
            dg.AssetCheckSpec(
                ERROR_RATE,
                asset=asset_key,
                description=f"Rows with an inference error are at most {pipeline.max_error_rate:.1%} of the rows.",
            )
        )
    if stage == ENGINE and "embeddings" in pipeline.task.engine_columns:
        specs.append(
            dg.AssetCheckSpec(
                EMBEDDINGS,
                asset=asset_key,
                description="Every row without an error has an embedding, all of one dimension, with no NaN.",
            )
        )
    if stage == prepare_multimodal.STAGE:
        specs.append(
            dg.AssetCheckSpec(
                MEDIA,
                asset=asset_key,
                description=(
                    "Rows whose images, audio or video could not be read or decoded are at most "
                    f"{pipeline.max_error_rate:.1%} of the rows with media."
                ),
            )
        )
    if stage == pipeline.text_stage() and pipeline.task.text_column:
        specs.append(
            dg.AssetCheckSpec(
                NOT_EMPTY, asset=asset_key, description="No row without an error has an empty generated_text."
            )
        )
        if pipeline.output_schema is not None:
            specs.append(
                dg.AssetCheckSpec(
                    SCHEMA_VALID,
                    asset=asset_key,
                    description=(
                        f"generated_text parses as {pipeline.output_schema.__name__} in at least "
                        f"{1 - pipeline.max_error_rate:.1%} of the rows without an error."
                    ),
                )
            )
    return specs


@dataclass
class PartitionFindings:
    """What the data-reading checks found in one committed partition of one stage."""

    partition: str
    duplicates: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    extra: list = field(default_factory=list)
    rows_checked: int = 0  # rows read by the row checks
    empty: list = field(default_factory=list)
    parsed: int = 0  # rows without an error the schema check parsed
    invalid: list = field(default_factory=list)
    dimensions: set = field(default_factory=set)  # embedding lengths seen
    bad_embeddings: list = field(default_factory=list)  # rows without an error whose embedding is missing or has NaN
    media_rows: int = 0  # rows with media, failed ones included
    media_items: Counter = field(default_factory=Counter)  # items read, by modality
    inline_bytes: int = 0  # media bytes stored in the stage's output (not references)
    media_failed: list = field(default_factory=list)  # rows whose media failed in prepare_multimodal

    @property
    def row_ids_ok(self) -> bool:
        return not (self.duplicates or self.missing or self.extra)


def partition_findings(
    pipeline: LLMPipeline, stage: str, stats: PartitionStats, storage, names: set[str]
) -> PartitionFindings:
    """Read the partition's committed output for the checks named in ``names``: the row checks
    share one read of the columns they need."""
    found = PartitionFindings(stats.partition)
    if ROW_IDS in names:
        _find_row_ids(pipeline, stage, stats, storage, found)
    row_checks = [ROW_CHECKS[name] for name in ROW_CHECKS if name in names]
    if row_checks:
        columns = sorted({ROW_ID, ERROR_COLUMN}.union(*(needs for _, needs in row_checks)))
        for table in storage.read_committed(pipeline.name, stage, stats.partition, columns):
            found.rows_checked += table.num_rows
            ok = _without_errors(table)
            for find, _ in row_checks:
                find(pipeline, table, ok, found)
    return found


def _without_errors(table: pa.Table) -> pa.Table:
    """The rows no stage marked as failed (a failed row is the error_rate check's)."""
    return (
        table.filter(pc.invert(failed_mask(table.column(ERROR_COLUMN))))
        if ERROR_COLUMN in table.column_names
        else table
    )


def _row_ids(storage, pipeline: str, stage: str, partition: str) -> Counter:
    ids: Counter = Counter()
    for table in storage.read_committed(pipeline, stage, partition, [ROW_ID]):
        ids.update(table.column(ROW_ID).to_pylist())
    return ids


def _find_row_ids(pipeline: LLMPipeline, stage: str, stats: PartitionStats, storage, found: PartitionFindings) -> None:
    upstream = pipeline.plan(stage).upstream
    out = _row_ids(storage, pipeline.name, stage, stats.partition)
    found.duplicates = [row_id for row_id, n in out.items() if n > 1]
    if upstream is None:  # against the source: as many distinct ids as rows read
        found.missing = [] if len(out) == stats.rows_in else [f"{stats.rows_in - len(out)} row(s)"]
    else:
        expected = _row_ids(storage, pipeline.name, upstream, stats.partition)
        found.missing = sorted(set(expected) - set(out))
        found.extra = sorted(set(out) - set(expected))


def _find_empty(pipeline: LLMPipeline, table: pa.Table, ok: pa.Table, found: PartitionFindings) -> None:
    if "generated_text" not in ok.column_names:
        return
    text = pc.utf8_trim_whitespace(pc.fill_null(ok.column("generated_text"), ""))
    found.empty += ok.filter(pc.equal(pc.utf8_length(text), 0)).column(ROW_ID).to_pylist()


def _find_invalid(pipeline: LLMPipeline, table: pa.Table, ok: pa.Table, found: PartitionFindings) -> None:
    """Parse the rows generated under the pipeline's schema (not those that set a constraint of
    their own)."""
    from pydantic import ValidationError

    ours = {"json": pipeline.output_json_schema}
    texts = ok.column("generated_text").to_pylist() if "generated_text" in ok.column_names else [None] * ok.num_rows
    params = ok.column("sampling_params").to_pylist() if "sampling_params" in ok.column_names else [None] * ok.num_rows
    for row_id, text, row_params in zip(ok.column(ROW_ID).to_pylist(), texts, params):
        if loads_params(row_params).get("structured_outputs") != ours:
            continue
        found.parsed += 1
        try:
            pipeline.output_schema.model_validate_json(text or "")
        except ValidationError:
            found.invalid.append(row_id)


def _find_bad_embeddings(pipeline: LLMPipeline, table: pa.Table, ok: pa.Table, found: PartitionFindings) -> None:
    ids = ok.column(ROW_ID).to_pylist()
    if "embeddings" not in ok.column_names:
        found.bad_embeddings += ids
        return
    vectors = ok.column("embeddings").combine_chunks()
    found.dimensions.update(n for n in pc.unique(pc.list_value_length(vectors)).to_pylist() if n is not None)
    with_nan = set(pc.list_parent_indices(vectors).filter(pc.is_nan(pc.list_flatten(vectors))).to_pylist())
    missing = set(pc.indices_nonzero(pc.is_null(vectors)).to_pylist())
    found.bad_embeddings += [ids[i] for i in sorted(with_nan | missing)]


def _find_media(pipeline: LLMPipeline, table: pa.Table, ok: pa.Table, found: PartitionFindings) -> None:
    if ERROR_COLUMN in table.column_names:
        failed_here = pc.starts_with(pc.fill_null(table.column(ERROR_COLUMN), ""), f"{prepare_multimodal.ERROR_TYPE}: ")
        failed = table.filter(failed_here).column(ROW_ID).to_pylist()
    else:
        failed = []
    found.media_failed += failed
    found.media_rows += len(failed)
    if media.COLUMN not in ok.column_names:
        return
    lists = ok.column(media.COLUMN).combine_chunks()
    found.media_rows += pc.sum(pc.greater(pc.fill_null(pc.list_value_length(lists), 0), 0)).as_py() or 0
    items = pc.list_flatten(lists)
    for count in pc.value_counts(items.field("modality")).to_pylist():
        found.media_items[count["values"]] += count["counts"]
    found.inline_bytes += pc.sum(pc.binary_length(items.field("data"))).as_py() or 0


# The checks that look at rows of a stage's output: the finder, and the columns it reads.
ROW_CHECKS = {
    NOT_EMPTY: (_find_empty, {"generated_text"}),
    SCHEMA_VALID: (_find_invalid, {"generated_text", "sampling_params"}),
    EMBEDDINGS: (_find_bad_embeddings, {"embeddings"}),
    MEDIA: (_find_media, {media.COLUMN}),
}


def stage_results(
    pipeline: LLMPipeline,
    results: list[PartitionStats],
    findings: list[PartitionFindings],
    names: set[str],
    asset_key: dg.AssetKey,
) -> list[dg.AssetCheckResult]:
    """The stage's check results over the run's partitions (``findings`` in the same order)."""
    checked = []
    if ROW_IDS in names:
        checked.append(_row_ids_result(findings, asset_key))
    if ERROR_RATE in names:
        checked.append(
            _error_rate_result(pipeline, sum(r.rows_out for r in results), sum(r.errors for r in results), asset_key)
        )
    if NOT_EMPTY in names:
        checked.append(_not_empty_result(findings, asset_key))
    if SCHEMA_VALID in names:
        checked.append(_schema_result(pipeline, findings, asset_key))
    if EMBEDDINGS in names:
        checked.append(_embeddings_result(findings, asset_key))
    if MEDIA in names:
        checked.append(_media_result(pipeline, findings, asset_key))
    return checked


def _row_ids_result(findings: list[PartitionFindings], asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    duplicates = [row_id for f in findings for row_id in f.duplicates]
    missing = [row_id for f in findings for row_id in f.missing]
    extra = [row_id for f in findings for row_id in f.extra]
    failing = [f.partition for f in findings if not f.row_ids_ok]
    return dg.AssetCheckResult(
        check_name=ROW_IDS,
        asset_key=asset_key,
        passed=not failing,
        metadata={
            "partitions_checked": len(findings),
            "duplicate_row_ids": len(duplicates),
            "missing_row_ids": len(missing),
            "unexpected_row_ids": len(extra),
            "failing_partitions": ", ".join(failing[:LISTED]),
            "examples": ", ".join(map(str, (duplicates + missing + extra)[:LISTED])),
        },
    )


def _error_rate_result(pipeline: LLMPipeline, rows: int, errors: int, asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    rate = errors / rows if rows else 0.0
    return dg.AssetCheckResult(
        check_name=ERROR_RATE,
        asset_key=asset_key,
        passed=rate <= pipeline.max_error_rate,
        metadata={
            "error_rate": round(rate, 6),
            "errors": errors,
            "rows": rows,
            "max_error_rate": pipeline.max_error_rate,
        },
    )


def _not_empty_result(findings: list[PartitionFindings], asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    empty = [row_id for f in findings for row_id in f.empty]
    return dg.AssetCheckResult(
        check_name=NOT_EMPTY,
        asset_key=asset_key,
        passed=not empty,
        metadata={
            "rows_checked": sum(f.rows_checked for f in findings),
            "empty_generations": len(empty),
            "examples": ", ".join(map(str, empty[:LISTED])),
        },
    )


def _schema_result(
    pipeline: LLMPipeline, findings: list[PartitionFindings], asset_key: dg.AssetKey
) -> dg.AssetCheckResult:
    invalid = [row_id for f in findings for row_id in f.invalid]
    parsed = sum(f.parsed for f in findings)
    rate = len(invalid) / parsed if parsed else 0.0
    return dg.AssetCheckResult(
        check_name=SCHEMA_VALID,
        asset_key=asset_key,
        passed=rate <= pipeline.max_error_rate,
        metadata={
            "rows_parsed": parsed,
            "invalid_rows": len(invalid),
            "valid_rate": round(1 - rate, 6),
            "schema": pipeline.output_schema.__name__,
            "examples": ", ".join(map(str, invalid[:LISTED])),
        },
    )


def _embeddings_result(findings: list[PartitionFindings], asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    bad = [row_id for f in findings for row_id in f.bad_embeddings]
    dimensions = sorted(set().union(*(f.dimensions for f in findings)))
    return dg.AssetCheckResult(
        check_name=EMBEDDINGS,
        asset_key=asset_key,
        passed=not bad and len(dimensions) <= 1,
        metadata={
            "dimensions": ", ".join(map(str, dimensions)),
            "bad_rows": len(bad),
            "examples": ", ".join(map(str, bad[:LISTED])),
        },
    )


def _media_result(
    pipeline: LLMPipeline, findings: list[PartitionFindings], asset_key: dg.AssetKey
) -> dg.AssetCheckResult:
    failed = [row_id for f in findings for row_id in f.media_failed]
    rows = sum(f.media_rows for f in findings)
    items = sum((f.media_items for f in findings), Counter())
    rate = len(failed) / rows if rows else 0.0
    return dg.AssetCheckResult(
        check_name=MEDIA,
        asset_key=asset_key,
        passed=rate <= pipeline.max_error_rate,
        metadata={
            "rows_with_media": rows,
            "failed_rows": len(failed),
            "failed_rate": round(rate, 6),
            **{f"{modality}_items": items[modality] for modality in ("image", "audio", "video")},
            "inline_mib": round(sum(f.inline_bytes for f in findings) / 2**20, 3),
            "examples": ", ".join(map(str, failed[:LISTED])),
        },
    )
