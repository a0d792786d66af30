"""The same config and rows through ray.data.llm 2.60 and through llm_assets, on vLLM's CPU build
with greedy sampling: a user who moves over by changing the import gets the same output rows.

ray.data.llm runs in a process of its own (its own local Ray, as a user's script would); llm_assets
runs the same processor config, preprocess and postprocess as a Dagster partition. The postprocess
reads input columns that only preprocess's merge carries through (``id``, ``topic``) and the error
column. Two shapes of row: chat ``messages`` through the chat template, and a plain ``prompt`` with
the chat template stage off.

One deliberate difference is asserted as such: llm_assets tokenizes the prompt that the chat
template wrote without adding special tokens (as vLLM's own chat path does: a template that
wants a BOS writes it; the README says why), so Ray 2.60's chat prompt has the tokenizer's BOS
in front. A plain prompt gets it in both, and the same tokens give the same greedy text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from llm_assets.engines.vllm.compat import CPU_ENGINE_ENV, CPU_ENGINE_KWARGS
from tests.helpers.data import write_jsonl
from tests.helpers.pipelines import make_resources, read_output, run_job

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PARTITION = "side.jsonl"
ROWS = [{"id": i, "topic": topic, "question": f"Tell me about {topic}."} for i, topic in enumerate("abcdefg")]


def config_kwargs(model: str, shape: str) -> dict:
    return {
        "chat_template_stage": {"enabled": shape == "messages"},
        "model_source": model,
        "engine_kwargs": {"max_model_len": 512, **CPU_ENGINE_KWARGS},
        "runtime_env": {"env_vars": dict(CPU_ENGINE_ENV)},
        "batch_size": 3,
        "concurrency": 1,
        "placement_group_config": {"bundles": [{"CPU": 1}]},
    }


SAMPLING = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def chat(row):
    return {"messages": [{"role": "user", "content": row["question"]}], "sampling_params": SAMPLING}


def plain(row):
    return {"prompt": row["question"], "sampling_params": SAMPLING}


PREPROCESS = {"messages": chat, "prompt": plain}


def postprocess(row):
    return {
        "id": row["id"],
        "topic": row["topic"],
        "answer": row["generated_text"],
        "prompt_tokens": row["num_input_tokens"],
        "generated_tokens": row["num_generated_tokens"],
        "error": row["__inference_error__"],
    }


def through_ray_data_llm(model: str, shape: str, out: Path) -> None:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    # Ray 2.60's CPU stages hold an actor each; its preprocess map task needs a CPU beside them.
    ray.init(num_cpus=8, include_dashboard=False)
    processor = build_processor(
        vLLMEngineProcessorConfig(**config_kwargs(model, shape)), preprocess=PREPROCESS[shape], postprocess=postprocess
    )
    out.write_text(json.dumps(processor(ray.data.from_items(ROWS)).take_all(), default=str))


@pytest.fixture(scope="module", params=["messages", "prompt"])
def shape(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ray_rows(tiny_model, shape, tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("ray-data-llm") / "rows.json"
    subprocess.run(
        [sys.executable, "-m", "tests.test_ray_data_llm_side_by_side", tiny_model, shape, str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        capture_output=True,
        timeout=400,
    )
    return {row["id"]: row for row in json.loads(out.read_text())}


@pytest.fixture(scope="module")
def our_rows(tiny_model, shape, tmp_path_factory) -> dict[int, dict]:
    from llm_assets import vLLMEngineProcessorConfig
    from llm_assets.pipeline import LLMPipeline
    from llm_assets.sources import LocalFolderSource

    root = tmp_path_factory.mktemp("llm-assets")
    write_jsonl(root / "landing" / PARTITION, ROWS)
    pipeline = LLMPipeline(
        "tiny",
        vLLMEngineProcessorConfig(**config_kwargs(tiny_model, shape)),
        LocalFolderSource(str(root / "landing")),
        preprocess=PREPROCESS[shape],
        postprocess=postprocess,
    )
    resources = make_resources(root / "storage")
    with dg.instance_for_test() as instance:
        assert run_job(pipeline, resources, instance, {"dagster/partition": PARTITION}).success
    return {row["id"]: row for row in read_output(resources["storage"].store(), "postprocess", PARTITION)}


def test_the_same_rows_come_out_of_both(ray_rows, our_rows, tiny_model, shape):
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(tiny_model)("x").input_ids[:-1]  # what the tokenizer adds in front
    assert sorted(ray_rows) == sorted(our_rows) == [row["id"] for row in ROWS]
    for row_id, theirs in ray_rows.items():
        ours = our_rows[row_id]
        print(f"{shape} {row_id}: ray.data.llm {theirs}\n  llm_assets {ours}")
        # Input columns carried through preprocess; a good row's error column is '' in both.
        assert (ours["id"], ours["topic"]) == (theirs["id"], theirs["topic"])
        assert ours["error"] == theirs["error"] == ""
        assert ours["generated_tokens"] == theirs["generated_tokens"] == SAMPLING["max_tokens"]
        if shape == "messages":  # Ray 2.60 puts the tokenizer's BOS before the templated prompt
            assert len(bos) == 1 and theirs["prompt_tokens"] == ours["prompt_tokens"] + 1
        else:  # the same tokens go to the engine: greedy decoding gives the same text
            assert theirs["prompt_tokens"] == ours["prompt_tokens"]
            assert theirs["answer"] == ours["answer"]
        assert set(ours) - {"row_id"} == set(theirs)  # llm_assets also keeps its stable row id


if __name__ == "__main__":  # the ray.data.llm run of ``ray_rows``, in a process of its own
    through_ray_data_llm(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
