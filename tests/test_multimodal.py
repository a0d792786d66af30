"""Multimodal rows: content parts read and decoded by PrepareMultimodal, handed to vLLM's CPU engine
as multi_modal_data (a tiny random Idefics3 and a tiny random Qwen2-Audio, built offline), media
served by a local HTTP server (the ``media`` fixture of conftest.py)."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import dagster as dg
import pyarrow as pa
import pytest

from llm_assets.rows import RowError
from tests.helpers.data import committed_rows, write_jsonl
from tests.helpers.stages import preprocess_stage

pytestmark = pytest.mark.slow

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> str:
    from llm_assets.testing import build_idefics3_model

    return str(build_idefics3_model(tmp_path_factory.mktemp("tiny-idefics3")))


@pytest.fixture(scope="module")
def alm(tmp_path_factory) -> str:
    from llm_assets.testing import build_qwen2_audio_model

    return str(build_qwen2_audio_model(tmp_path_factory.mktemp("tiny-qwen2-audio")))


@pytest.fixture(scope="module")
def prepare(vlm):
    from llm_assets.stages.prepare_multimodal import PrepareMultimodalStage

    return PrepareMultimodalStage(vlm)


def image_row(url: str, row_id: str = "r0") -> dict:
    return {
        "row_id": row_id,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
            }
        ],
    }


def prepared(prepare, rows: list[dict], fn=None) -> list[dict]:
    return prepare(preprocess_stage(fn, prepare_multimodal_stage=True)(pa.Table.from_pylist(rows))).to_pylist()


def test_every_kind_of_image_part_becomes_a_placeholder_and_a_stored_item(prepare, media):
    from PIL import Image

    folder, base = media
    png = (folder / "red.png").read_bytes()
    data = "data:image/png;base64," + base64.b64encode(png).decode()

    def pil_in_preprocess(row):  # a PIL image exists only inside the user's function, never in a file
        if row["row_id"] != "pil":
            return row
        return {
            "messages": [{"role": "user", "content": [{"type": "image_pil", "image_pil": Image.open(io.BytesIO(png))}]}]
        }

    rows = prepared(
        prepare,
        [
            image_row(f"{base}/red.png", "http"),
            image_row(str(folder / "red.png"), "path"),
            image_row((folder / "red.png").as_uri(), "file"),
            image_row(data, "data"),
            {"row_id": "pil"},
        ],
        pil_in_preprocess,
    )
    for row in rows:
        assert "<image>" in json.loads(row["messages"])[0]["content"], row["row_id"]
        [item] = row["multimodal_data"]
        assert item["modality"] == "image"
        if row["row_id"] in ("http", "path", "file"):  # a reference: the bytes are not copied into Parquet
            assert item["data"] is None and item["uri"] and item["sha256"] == hashlib.sha256(png).hexdigest()
        else:  # inline media keep their encoded bytes (a PIL image: PNG), never a pickled object
            assert item["uri"] is None and Image.open(io.BytesIO(item["data"])).size == (80, 60)
    assert pa.Table.from_pylist(rows).schema.field("multimodal_data").type.value_type.field("data").type == pa.binary()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("missing.png", "HTTP 404"),
        ("corrupt.png", "does not decode"),
    ],
)
def test_a_bad_image_fails_its_row_naming_the_part(prepare, media, name, expected):
    folder, base = media
    with pytest.raises(RowError) as error:
        prepared(prepare, [image_row(f"{base}/{name}", "bad-row")])
    assert (
        "bad-row" in str(error.value)
        and "messages[0].content[0].image_url" in str(error.value)
        and expected in str(error.value)
    )
    with pytest.raises(RowError, match="cannot read"):
        prepared(prepare, [image_row(str(folder / "nowhere" / name))])


def test_audio_and_video_are_read_and_decoded_and_refused_by_an_image_model(prepare, media):
    from llm_assets.stages import media as media_module

    folder, base = media
    wav = (folder / "tone.wav").read_bytes()
    samples, rate = media_module.decode("audio", "audio/wav", wav)
    assert (samples.shape, rate) == ((8000,), 16000)
    item, data = media_module.read_item("video", f"{base}/clip.mp4")
    frames, info = getattr(media_module.decode("video", item["mime_type"], data), "media", None) or media_module.decode(
        "video", item["mime_type"], data
    )
    assert frames.shape == (8, 64, 64, 3) and item["data"] is None
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    with pytest.raises(RowError, match=r"audio.*may be provided"):  # decoded, then this model takes no audio
        prepared(prepare, [{"row_id": "a", "messages": [{"role": "user", "content": [audio]}]}])
    with pytest.raises(RowError, match=r"content\[0\].audio_url: the audio .* does not decode"):
        bad = {"type": "audio_url", "audio_url": {"url": f"{base}/corrupt.png"}}
        prepared(prepare, [{"row_id": "b", "messages": [{"role": "user", "content": [bad]}]}])


def test_content_parts_need_the_stage_and_a_known_type():
    row = image_row("http://127.0.0.1:1/x.png")
    with pytest.raises(RowError, match="enable prepare_multimodal_stage"):
        preprocess_stage()(pa.Table.from_pylist([row]))
    row["messages"][0]["content"][0] = {"type": "image", "image": "x"}
    with pytest.raises(RowError, match=r"r0.*messages\[0\].content\[0\].*'type' is one of"):
        preprocess_stage(prepare_multimodal_stage=True)(pa.Table.from_pylist([row]))


def test_image_tokens_reach_the_engine(tmp_path, vlm, media, ray_session, instance):
    """One Dagster run on the CPU engine: the same question with and without an image; the image
    row's prompt is one placeholder longer in Tokenize's output and many tokens longer in the engine.
    With should_continue_on_error, a row whose image is gone (404) is kept as a failed row and the
    media_readable check counts it."""
    from llm_assets.pipeline import LLMPipeline
    from llm_assets.sources import LocalFolderSource
    from tests.helpers.pipelines import make_resources, run_job

    folder, base = media
    write_jsonl(
        tmp_path / "landing" / "pictures.jsonl",
        [
            {"image": None},
            {"image": f"{base}/red.png"},
            {"image": str(folder / "red.png")},
            {"image": f"{base}/gone.png"},
        ],
    )

    def to_chat(row):
        parts = [{"type": "text", "text": QUESTION}]
        if row["image"]:
            parts.insert(0, {"type": "image_url", "image_url": {"url": row["image"]}})
        return {
            "image": row["image"],
            "messages": [{"role": "user", "content": parts}],
            "sampling_params": {"max_tokens": 4, "temperature": 0},
        }

    pipeline = LLMPipeline(
        "vlm",
        {
            "model_source": vlm,
            "engine_kwargs": {"max_model_len": 512},
            "prepare_multimodal_stage": True,
            "should_continue_on_error": True,
        },
        LocalFolderSource(str(tmp_path / "landing")),
        preprocess=to_chat,
    )
    assert pipeline.stage_names()[:3] == ["preprocess", "prepare_multimodal", "chat_template"]
    resources = make_resources(tmp_path / "storage")
    result = run_job(pipeline, resources, instance, {"dagster/partition": "pictures.jsonl"})
    assert result.success  # a failed check warns; it does not fail the run
    storage = resources["storage"].store()

    def rows(stage):
        return committed_rows(storage, "vlm", stage, "pictures.jsonl", "row_id")

    tokens = [len(r["tokenized_prompt"]) for r in rows("tokenize")[:3]]
    engine = rows("engine")
    seen = [r["num_input_tokens"] for r in engine[:3]]
    assert tokens[1] == tokens[2] > tokens[0] and seen[1] == seen[2] >= seen[0] + 16, (tokens, seen)
    assert all(r.get("__inference_error__") == "" and r["num_generated_tokens"] == 4 for r in engine[:3])
    assert (
        engine[3]["__inference_error__"].startswith("MediaError: messages[0].content[0].image_url: GET ")
        and "404" in engine[3]["__inference_error__"]
    )
    assert "multimodal_data" not in engine[0]  # the media stay in the stages before the engine
    assert [r["generated_text"] is not None for r in rows("postprocess")] == [True, True, True, False]
    check = next(
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.check_name == "media_readable"
    )
    metadata = {name: value.value for name, value in check.metadata.items()}
    assert not check.passed and check.asset_key == dg.AssetKey(["vlm", "prepare_multimodal"])
    # Media by URL or path are stored as references: no bytes inline.
    assert metadata == {
        "rows_with_media": 3,
        "failed_rows": 1,
        "failed_rate": 0.333333,
        "image_items": 2,
        "audio_items": 0,
        "video_items": 0,
        "inline_mib": 0.0,
        "examples": "pictures.jsonl:3",
    }, metadata


def test_audio_tokens_reach_the_engine(tmp_path, alm, media, ray_session, instance):
    """One Dagster run on the CPU engine: the same question without audio, with base64 input_audio
    and with an audio_url. Tokenize's prompt holds one <|AUDIO|> placeholder; the engine's prompt
    holds as many <|AUDIO|> tokens as the 0.5 s WAV makes: 50 mel frames -> 25 -> 12."""
    from transformers import AutoTokenizer

    from llm_assets.pipeline import LLMPipeline
    from llm_assets.sources import LocalFolderSource
    from tests.helpers.pipelines import make_resources, run_job

    folder, base = media
    wav = base64.b64encode((folder / "tone.wav").read_bytes()).decode()
    write_jsonl(
        tmp_path / "landing" / "sounds.jsonl", [{"kind": "a-none"}, {"kind": "b-input_audio"}, {"kind": "c-audio_url"}]
    )

    def to_chat(row):
        parts = [{"type": "text", "text": "What is in the sound?"}]
        if row["kind"] == "b-input_audio":
            parts.insert(0, {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}})
        elif row["kind"] == "c-audio_url":
            parts.insert(0, {"type": "audio_url", "audio_url": {"url": f"{base}/tone.wav"}})
        return {
            "kind": row["kind"],
            "messages": [{"role": "user", "content": parts}],
            "sampling_params": {"max_tokens": 4, "temperature": 0},
        }

    pipeline = LLMPipeline(
        "alm",
        {"model_source": alm, "engine_kwargs": {"max_model_len": 512}, "prepare_multimodal_stage": True},
        LocalFolderSource(str(tmp_path / "landing")),
        preprocess=to_chat,
    )
    resources = make_resources(tmp_path / "storage")
    assert run_job(pipeline, resources, instance, {"dagster/partition": "sounds.jsonl"}).success
    storage = resources["storage"].store()

    def rows(stage):
        return committed_rows(storage, "alm", stage, "sounds.jsonl", "kind")

    audio_token = AutoTokenizer.from_pretrained(alm).convert_tokens_to_ids("<|AUDIO|>")
    prompts = [r["tokenized_prompt"] for r in rows("tokenize")]
    assert [p.count(audio_token) for p in prompts] == [0, 1, 1]
    tokens = [len(p) for p in prompts]
    engine = rows("engine")
    seen = [r["num_input_tokens"] for r in engine]
    audio_tokens = 12
    # The placeholder's wrapping text ("Audio 1: <|audio_bos|>...<|audio_eos|>") is in both counts;
    # the engine's prompt has the placeholder expanded to the audio's tokens.
    assert (
        tokens[1] == tokens[2] > tokens[0]
        and seen[1] == seen[2] == seen[0] + (tokens[1] - tokens[0]) - 1 + audio_tokens
    ), (tokens, seen)
    assert all(r.get("__inference_error__") == "" and r["num_generated_tokens"] == 4 for r in engine), engine
    assert "multimodal_data" not in engine[0]
    assert [r["generated_text"] is not None for r in rows("postprocess")] == [True] * 3
