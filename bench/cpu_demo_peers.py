"""The CPU demo's work done by its peers, for bench/cpu_demo.py to measure beside the demo job: the
same model (the demo's SmolLM2, converted once into the model cache), the same 20 prompts, the
same chat template and greedy sampling (64 tokens), vLLM's CPU build with the engine settings
llm_assets gives it on CPU.

    python bench/cpu_demo_peers.py raw_vllm       # vLLM's offline LLM.chat over the prompts
    python bench/cpu_demo_peers.py ray_data_llm   # ray.data.llm 2.60's processor over the prompts file

Prints the answers' count and the first answer.
"""

from __future__ import annotations

import json
import os
import sys

from llm_assets.demo import DATA_DIR, smollm2_gguf_path, to_answer, to_chat
from llm_assets.engines.vllm.compat import CPU_ENGINE_ENV, CPU_ENGINE_KWARGS
from llm_assets.models import resolve_model_source

PROMPTS = DATA_DIR / "prompts.jsonl"
ENGINE_KWARGS = {"max_model_len": 2048, **CPU_ENGINE_KWARGS}


def raw_vllm(model: str) -> list[dict]:
    os.environ.update(CPU_ENGINE_ENV)
    from vllm import LLM, SamplingParams

    rows = [to_chat(json.loads(line)) for line in PROMPTS.read_text().splitlines() if line.strip()]
    llm = LLM(model=model, **ENGINE_KWARGS)
    outputs = llm.chat([row["messages"] for row in rows], SamplingParams(**rows[0]["sampling_params"]))
    return [{"question": row["question"], "answer": out.outputs[0].text.strip()} for row, out in zip(rows, outputs)]


def ray_data_llm(model: str) -> list[dict]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    # ray.data.llm 2.60 holds a CPU for each of its four stage actors and needs one more for its
    # preprocess task: 8 logical CPUs, as Ray's own CPU tests start (4 would wait forever).
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=ENGINE_KWARGS,
        runtime_env={"env_vars": dict(CPU_ENGINE_ENV)},
        batch_size=32,
        concurrency=1,
        placement_group_config={"bundles": [{"CPU": 1}]},
    )
    processor = build_processor(config, preprocess=to_chat, postprocess=to_answer)
    return processor(ray.data.read_json(str(PROMPTS))).take_all()


if __name__ == "__main__":
    model = resolve_model_source(smollm2_gguf_path(), log=lambda _: None)
    answers = {"raw_vllm": raw_vllm, "ray_data_llm": ray_data_llm}[sys.argv[1]](model)
    print(json.dumps({"answers": len(answers), "first": answers[0]}), flush=True)
