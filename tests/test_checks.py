"""Asset checks on committed partitions: each partition's findings, and a stage's results over
several partitions. The runs in test_data_arrival.py show them passing; here committed outputs
are written by hand (through the real storage) with the faults a check exists to catch."""

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from llm_assets.defs import checks
from llm_assets.execution.stats import PartitionStats
from llm_assets.resources import PartitionStorage
from llm_assets.rows import ERROR_COLUMN, ROW_ID
from llm_assets.storage import PartitionStore, new_attempt_name
from tests.helpers.pipelines import make_pipeline

KEY = dg.AssetKey(["tiny", "x"])


def commit(storage: PartitionStorage, stage: str, partition: str, columns: dict) -> None:
    attempt = new_attempt_name()
    storage.create_attempt("tiny", stage, partition, attempt)
    table = pa.table(columns)
    pq.write_table(table, f"{storage.partition_dir('tiny', stage, partition)}/{attempt}/part-0.parquet")
    storage.commit("tiny", stage, partition, attempt, [f"{attempt}/part-0.parquet"], [table.num_rows], {})


def test_row_id_faults_are_found_per_partition_and_added_up_per_stage(tmp_path, tiny_model):
    pipeline = make_pipeline(tmp_path / "landing", tiny_model)
    storage = PartitionStore(root=str(tmp_path / "storage"))
    for partition in ("good.jsonl", "bad.jsonl"):
        commit(storage, "preprocess", partition, {ROW_ID: [f"{partition}:{i}" for i in range(4)]})
    commit(storage, "chat_template", "good.jsonl", {ROW_ID: [f"good.jsonl:{i}" for i in range(4)]})
    # one row twice, two rows lost, one row from nowhere
    commit(
        storage, "chat_template", "bad.jsonl", {ROW_ID: ["bad.jsonl:0", "bad.jsonl:1", "bad.jsonl:1", "bad.jsonl:9"]}
    )

    names = {checks.ROW_IDS}
    source_side = checks.partition_findings(
        pipeline, "preprocess", PartitionStats("bad.jsonl", rows_in=4), storage, names
    )
    assert source_side.row_ids_ok
    fewer_than_read = checks.partition_findings(
        pipeline, "preprocess", PartitionStats("bad.jsonl", rows_in=6), storage, names
    )
    assert fewer_than_read.missing == ["2 row(s)"]

    stats = [PartitionStats("good.jsonl"), PartitionStats("bad.jsonl")]
    findings = [checks.partition_findings(pipeline, "chat_template", s, storage, names) for s in stats]
    assert findings[1].duplicates == ["bad.jsonl:1"]
    assert findings[1].missing == ["bad.jsonl:2", "bad.jsonl:3"]
    assert findings[1].extra == ["bad.jsonl:9"]

    [result] = checks.stage_results(pipeline, stats, findings, names, KEY)
    assert not result.passed
    metadata = {name: value.value for name, value in result.metadata.items()}
    assert metadata["partitions_checked"] == 2
    assert metadata["failing_partitions"] == "bad.jsonl"
    assert (metadata["duplicate_row_ids"], metadata["missing_row_ids"], metadata["unexpected_row_ids"]) == (1, 2, 1)


def test_an_empty_generation_fails_its_check_unless_the_row_has_an_error(tmp_path, tiny_model):
    pipeline = make_pipeline(tmp_path / "landing", tiny_model)
    storage = PartitionStore(root=str(tmp_path / "storage"))
    commit(
        storage,
        "detokenize",
        "a.jsonl",
        {
            ROW_ID: ["a.jsonl:0", "a.jsonl:1", "a.jsonl:2"],
            "generated_text": ["fine", "  ", None],
            ERROR_COLUMN: [None, None, "prompt too long"],
        },
    )
    names = {checks.NOT_EMPTY, checks.ERROR_RATE}
    stats = [PartitionStats("a.jsonl", rows_out=3, errors=1)]
    findings = [checks.partition_findings(pipeline, "detokenize", stats[0], storage, names)]
    assert findings[0].empty == ["a.jsonl:1"]
    results = {r.check_name: r for r in checks.stage_results(pipeline, stats, findings, names, KEY)}
    assert not results[checks.NOT_EMPTY].passed
    assert results[checks.NOT_EMPTY].metadata["rows_checked"].value == 3
    assert results[checks.ERROR_RATE].metadata["errors"].value == 1


def test_text_that_does_not_parse_as_the_output_schema_fails_schema_valid(tmp_path, tiny_model):
    import dataclasses
    import json

    from pydantic import BaseModel

    class Answer(BaseModel):
        answer: str

    pipeline = dataclasses.replace(make_pipeline(tmp_path / "landing", tiny_model), output_schema=Answer)
    ours = json.dumps({"structured_outputs": {"json": Answer.model_json_schema()}})
    own = json.dumps({"structured_outputs": {"regex": "[a-z]+"}})
    storage = PartitionStore(root=str(tmp_path / "storage"))
    commit(
        storage,
        "detokenize",
        "a.jsonl",
        {
            ROW_ID: ["a:0", "a:1", "a:2", "a:3"],
            "generated_text": ['{"answer": "x"}', '{"answer": ', "abc", '{"answer": '],
            "sampling_params": [ours, ours, own, ours],
            ERROR_COLUMN: [None, None, None, "ValueError: cut"],  # a failed row is the error_rate check's
        },
    )
    names = {checks.SCHEMA_VALID}
    assert checks.SCHEMA_VALID in {spec.name for spec in checks.check_specs(pipeline, "detokenize", KEY)}
    found = checks.partition_findings(pipeline, "detokenize", PartitionStats("a.jsonl"), storage, names)
    assert (found.parsed, found.invalid) == (2, ["a:1"])  # the row with its own regex is not parsed
    [result] = checks.stage_results(pipeline, [PartitionStats("a.jsonl")], [found], names, KEY)
    assert not result.passed and result.metadata["valid_rate"].value == 0.5


def test_a_missing_nan_or_odd_sized_embedding_fails_embeddings_valid(tmp_path):
    from llm_assets import vLLMEngineProcessorConfig
    from llm_assets.pipeline import LLMPipeline
    from llm_assets.sources import LocalFolderSource

    pipeline = LLMPipeline(
        "tiny", vLLMEngineProcessorConfig(model_source="m", task_type="embed"), LocalFolderSource(str(tmp_path))
    )
    storage = PartitionStore(root=str(tmp_path / "storage"))
    commit(
        storage,
        "engine",
        "a.jsonl",
        {
            ROW_ID: ["a:0", "a:1", "a:2", "a:3"],
            "embeddings": pa.array([[0.1, 0.2], [float("nan"), 0.2], None, [0.3, 0.4]], pa.list_(pa.float32())),
            ERROR_COLUMN: [None, None, None, "ValueError: refused"],
        },
    )
    commit(
        storage,
        "engine",
        "b.jsonl",
        {ROW_ID: ["b:0"], "embeddings": pa.array([[0.1, 0.2, 0.3]], pa.list_(pa.float32()))},
    )
    names = {checks.EMBEDDINGS}
    assert checks.EMBEDDINGS in {spec.name for spec in checks.check_specs(pipeline, "engine", KEY)}
    assert checks.NOT_EMPTY not in {spec.name for spec in checks.check_specs(pipeline, "engine", KEY)}
    stats = [PartitionStats("a.jsonl"), PartitionStats("b.jsonl")]
    findings = [checks.partition_findings(pipeline, "engine", s, storage, names) for s in stats]
    assert findings[0].bad_embeddings == ["a:1", "a:2"] and findings[0].dimensions == {2}
    [result] = checks.stage_results(pipeline, stats, findings, names, KEY)
    assert not result.passed and result.metadata["dimensions"].value == "2, 3"


def test_media_that_failed_to_read_fails_media_readable_and_the_media_are_counted(tmp_path, tiny_model):
    from llm_assets.pipeline import LLMPipeline
    from llm_assets.sources import LocalFolderSource
    from llm_assets.stages import media

    pipeline = LLMPipeline(
        "tiny", {"model_source": tiny_model, "prepare_multimodal_stage": True}, LocalFolderSource(str(tmp_path))
    )
    assert checks.MEDIA in {spec.name for spec in checks.check_specs(pipeline, "prepare_multimodal", KEY)}
    assert checks.MEDIA not in {spec.name for spec in checks.check_specs(pipeline, "chat_template", KEY)}
    storage = PartitionStore(root=str(tmp_path / "storage"))

    def item(modality, data=None):
        return {
            "modality": modality,
            "uri": None if data else "http://x/y",
            "mime_type": "x/y",
            "sha256": "0",
            "data": data,
        }

    commit(
        storage,
        "prepare_multimodal",
        "a.jsonl",
        {
            ROW_ID: ["a:0", "a:1", "a:2", "a:3"],
            media.COLUMN: pa.array(
                [[item("image", b"\x00" * 2**20), item("audio")], None, [item("video")], None], media.COLUMN_TYPE
            ),
            ERROR_COLUMN: [
                None,
                None,
                None,
                "MediaError: messages[0].content[0].image_url: GET http://x/gone.png answered HTTP 404 Not Found",
            ],
        },
    )
    commit(
        storage,
        "prepare_multimodal",
        "b.jsonl",
        {ROW_ID: ["b:0"], media.COLUMN: pa.array([[item("image")]], media.COLUMN_TYPE)},
    )
    names = {checks.MEDIA}
    stats = [PartitionStats("a.jsonl"), PartitionStats("b.jsonl")]
    findings = [checks.partition_findings(pipeline, "prepare_multimodal", s, storage, names) for s in stats]
    assert (findings[0].media_rows, findings[0].media_failed, dict(findings[0].media_items)) == (
        3,
        ["a:3"],
        {"image": 1, "audio": 1, "video": 1},
    )
    [result] = checks.stage_results(pipeline, stats, findings, names, KEY)
    metadata = {name: value.value for name, value in result.metadata.items()}
    assert not result.passed
    assert metadata == {
        "rows_with_media": 4,
        "failed_rows": 1,
        "failed_rate": 0.25,
        "image_items": 2,
        "audio_items": 1,
        "video_items": 1,
        "inline_mib": 1.0,
        "examples": "a:3",
    }
    passing = [checks.partition_findings(pipeline, "prepare_multimodal", stats[1], storage, names)]
    assert checks.stage_results(pipeline, stats[1:], passing, names, KEY)[0].passed
