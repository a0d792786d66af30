"""The multimodal example: a vision-language model answers a question about each landed image.

Rows name their image by URL or path (``{"image": "https://.../cat.jpg", "question": "..."}``);
PrepareMultimodal reads and decodes each image, the engine gets it as ``multi_modal_data``.

``python -m llm_assets.demo.captions`` runs it end to end without a model hub: it builds a tiny
random Idefics3 (its captions are noise), draws three images, lands them in a temporary folder and
runs every stage in one Dagster run on vLLM's CPU build, then prints each row's prompt token count
(the image's tokens included) and caption.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from llm_assets.engines.vllm import vLLMEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource


def to_chat(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "image": row["image"],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": row["image"]}},
                    {"type": "text", "text": row.get("question") or "Describe the image in one sentence."},
                ],
            }
        ],
        "sampling_params": {"max_tokens": 16, "temperature": 0},
    }


def to_caption(row: dict[str, Any]) -> dict[str, Any]:
    return {"image": row["image"], "caption": row["generated_text"], "prompt_tokens": row["num_input_tokens"]}


def captions_pipeline(model_source: str, landing: str, **engine_kwargs: Any) -> LLMPipeline:
    config = vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs={"max_model_len": 2048, "limit_mm_per_prompt": {"image": 1}, **engine_kwargs},
        prepare_multimodal_stage={"enabled": True, "model_config_kwargs": {"limit_mm_per_prompt": {"image": 1}}},
        batch_size=16,
    )
    return LLMPipeline(
        name="captions",
        config=config,
        source=LocalFolderSource(landing, pattern="*.jsonl"),
        preprocess=to_chat,
        postprocess=to_caption,
        description="A vision-language model answers a question about each landed image.",
    )


def main() -> None:
    import dagster as dg
    from PIL import Image

    from llm_assets.defs.factory import add_partitions_for_new_files, build_definitions
    from llm_assets.resources import PartitionStorage, make_resources
    from llm_assets.testing import build_idefics3_model

    root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="llm-assets-captions-"))
    model = build_idefics3_model(root / "tiny-idefics3")
    (root / "landing").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, color in (("red", (220, 30, 30)), ("green", (30, 200, 60)), ("blue", (30, 60, 220))):
        Image.new("RGB", (96, 64), color).save(root / f"{name}.png")
        rows.append({"image": str(root / f"{name}.png"), "question": f"Is this picture {name}?"})
    (root / "landing" / "images.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pipeline = captions_pipeline(str(model), str(root / "landing"), max_model_len=512)
    resources = make_resources(PartitionStorage(root=str(root / "storage")))
    with dg.instance_for_test() as instance:
        add_partitions_for_new_files(instance, pipeline)
        job = build_definitions([pipeline], resources).resolve_job_def("captions_job")
        job.execute_in_process(instance=instance, tags={"dagster/partition": "images.jsonl"})
    for table in resources["storage"].store().read_committed("captions", "postprocess", "images.jsonl"):
        for row in table.to_pylist():
            print(f"{Path(row['image']).name}: {row['prompt_tokens']} prompt tokens -> {row['caption']!r}")


if __name__ == "__main__":
    main()
