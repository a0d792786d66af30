"""Run one system over the benchmark workload and write its measurements as JSON.

    python bench/run_one.py {raw_vllm,ray_data_llm,llm_assets,raw_sglang,llm_assets_sglang}
        --workload DIR/workload.json --out result.json

Each system runs in its own process (fresh GPU) on the same prompts, model config and card:
- raw_vllm:     vLLM's offline ``LLM.generate`` on the chat-templated token ids (the ceiling);
- ray_data_llm: ``ray.data.llm`` with ``vLLMEngineProcessorConfig`` defaults, read JSONL -> Parquet;
- llm_assets:   one Dagster run over every partition, every stage asset materialized to Parquet;
- raw_sglang:   SGLang's offline ``Engine.generate`` on the same token ids (GPU only);
- llm_assets_sglang: the llm_assets run with ``SGLangEngineProcessorConfig`` (GPU only).
"""

from __future__ import annotations

import time

# Every system's clock starts with its process: importing vLLM (or Ray, or Dagster) is part of
# what its user waits for, cold or warm.
PROCESS_START = time.time()

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor import Monitor  # noqa: E402
from workload import messages, sampling_params  # noqa: E402

# TP on the test machines, where NVLink multicast is off: see llm_assets/testing.py.
from llm_assets.testing import TP_SAFE_ENGINE_KWARGS, TP_SAFE_ENV  # noqa: E402


def has_gpu() -> bool:
    # Not torch.cuda.is_available(): touching CUDA in this process before vLLM forks its engine
    # core makes the fork fail ("Cannot re-initialize CUDA in forked subprocess").
    return shutil.which("nvidia-smi") is not None


def model_parallel() -> dict:
    """TP=N, PP=M: every vLLM engine (raw and llm_assets') spans N x M GPUs, with the settings above."""
    tp, pp = int(os.environ.get("TP", "1")), int(os.environ.get("PP", "1"))
    return {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, **TP_SAFE_ENGINE_KWARGS} if tp * pp > 1 else {}


def engine_kwargs() -> dict:
    from llm_assets.engines.vllm import compat as vllm_compat

    # On a machine without a GPU (a smoke run of the bench), vLLM's CPU build needs its settings.
    return vllm_compat.platform_engine_kwargs(
        {"load_format": "dummy", "max_model_len": 2048, **model_parallel()}, has_gpu()
    )


def engine_env() -> dict:
    """ENGINE_ENV="KEY=VALUE,KEY=VALUE": environment of llm_assets' engine actors, to compare engine
    settings in one sitting (e.g. VLLM_ENABLE_V1_MULTIPROCESSING=1: the engine core in a process of its own)."""
    pairs = [item.split("=", 1) for item in os.environ.get("ENGINE_ENV", "").split(",") if item]
    return {key: value for key, value in pairs}


def read_rows(spec: dict) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(f"{spec['landing']}/*.jsonl")):
        rows.extend(json.loads(line) for line in open(path))
    return rows


def raw_vllm(spec: dict, monitor: Monitor) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **engine_kwargs())
    ready = time.time()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    prompts = [
        {
            "prompt_token_ids": tokenizer.apply_chat_template(
                messages(row), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        }
        for row in read_rows(spec)
    ]
    steps = count_steps(llm.llm_engine)
    generating = time.time()
    outputs = llm.generate(prompts, SamplingParams(**sampling_params(spec["max_tokens"])), use_tqdm=False)
    done = time.time()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        # As llm_assets' engine reports its loop: steps, and the seconds spent in them.
        "engine_steps": steps["steps"],
        "engine_stepping_s": round(steps["stepping_s"], 2),
        # Engine start from the process's start: import vllm, then LLM(...).
        "rows": len(outputs),
        "output_tokens": tokens,
        "engine_start_s": ready - PROCESS_START,
        "generate_s": done - generating,
        "wall_s": done - PROCESS_START,
        "gpu_busy": monitor.gpu_busy_fraction(generating, done),
        "gpu_util_mean": monitor.mean_gpu_util(generating, done),
    }


def count_steps(engine) -> dict:
    """Count the engine's ``step()`` calls and the time in them (LLM.generate steps until done)."""
    counts = {"steps": 0, "stepping_s": 0.0}
    step = engine.step

    def counted(*args, **kwargs):
        started = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            counts["steps"] += 1
            counts["stepping_s"] += time.perf_counter() - started

    engine.step = counted
    return counts


def ray_data_llm(spec: dict, monitor: Monitor) -> dict:
    import ray
    import ray.data
    from ray.data import llm as ray_llm

    ray.init(include_dashboard=False)
    config = ray_llm.vLLMEngineProcessorConfig(model_source=spec["model"], engine_kwargs=engine_kwargs())
    params = sampling_params(spec["max_tokens"])
    build = getattr(ray_llm, "build_processor", None) or ray_llm.build_llm_processor
    processor = build(
        config,
        preprocess=lambda row: {"id": row["id"], "messages": messages(row), "sampling_params": params},
        postprocess=lambda row: {"id": row["id"], "n": row["num_generated_tokens"], "t": time.time()},
    )
    out = tempfile.mkdtemp(prefix="ray-data-llm-out-")
    processor(ray.data.read_json(sorted(glob.glob(f"{spec['landing']}/*.jsonl")))).write_parquet(out)
    done = time.time()
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    times = sorted(table.column("t").to_pylist())
    tokens = sum(table.column("n").to_pylist())
    return {
        "rows": table.num_rows,
        "output_tokens": tokens,
        "first_output_s": times[0] - PROCESS_START,
        # From the first row out to the last: slightly flatters the peer (the first batch's
        # generation time is outside the window).
        "generate_s": times[-1] - times[0],
        "wall_s": done - PROCESS_START,
        "gpu_busy": monitor.gpu_busy_fraction(times[0], times[-1]),
        "gpu_util_mean": monitor.mean_gpu_util(times[0], times[-1]),
    }


# Log lines kept in llm_assets' result: its timeline from process start to the run's end.
STAGE_LOG_KEYS = ("committed", "vLLM", "execution of", "partition(s):", "partitions committed", "Ray Data ")


def llm_assets(spec: dict, monitor: Monitor, engines: int = 1) -> dict:
    return run_llm_assets(
        spec,
        monitor,
        {
            "model_source": spec["model"],
            "engine_kwargs": {"load_format": "dummy", "max_model_len": 2048, **model_parallel()},
            "runtime_env": {"env_vars": {**engine_env(), **(TP_SAFE_ENV if model_parallel() else {})}},
            "concurrency": engines,
            **json.loads(os.environ.get("CONFIG", "{}")),
        },
    )


def llm_assets_2gpu(spec: dict, monitor: Monitor) -> dict:
    """Two engine replicas, one per GPU (a 2-GPU machine; with TP=2, two GPUs each), fed from the same partitions."""
    return llm_assets(spec, monitor, engines=2)


def llm_assets_sglang(spec: dict, monitor: Monitor) -> dict:
    """llm_assets with the SGLang engine, on the same prompts as raw_sglang."""
    from llm_assets import SGLangEngineProcessorConfig

    return run_llm_assets(
        spec,
        monitor,
        SGLangEngineProcessorConfig(
            model_source=spec["model"],
            engine_kwargs={"load_format": "dummy", "context_length": 2048},
            runtime_env={"env_vars": engine_env()},
        ),
    )


def run_llm_assets(spec: dict, monitor: Monitor, config) -> dict:
    import dagster as dg

    from llm_assets.defs.factory import add_partitions_for_new_files, build_definitions
    from llm_assets.engines import engine_for
    from llm_assets.pipeline import LLMPipeline
    from llm_assets.resources import PartitionStorage, make_resources
    from llm_assets.sources import LocalFolderSource

    params = sampling_params(spec["max_tokens"])
    pipeline = LLMPipeline(
        "bench",
        config,
        LocalFolderSource(spec["landing"]),
        preprocess=lambda row: {"id": row["id"], "messages": messages(row), "sampling_params": params},
        postprocess=lambda row: {
            "id": row["id"],
            "generated_text": row["generated_text"],
            "n": row["num_generated_tokens"],
        },
    )
    label = engine_for(pipeline.config).label
    resources = make_resources(PartitionStorage(root=tempfile.mkdtemp(prefix="llm-assets-out-")))
    with dg.instance_for_test() as instance:
        add_partitions_for_new_files(instance, pipeline)
        keys = instance.get_dynamic_partitions("bench")
        job = build_definitions([pipeline], resources).resolve_job_def("bench_job")
        result = job.execute_in_process(
            instance=instance,
            tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
        )
        assert result.success
        logs = [(e.timestamp, e.user_message) for e in instance.all_logs(result.run_id)]
        engine = instance.get_latest_materialization_event(dg.AssetKey(["bench", "engine"])).asset_materialization
    stamp = lambda text, last=False: [t for t, m in logs if text in m][-1 if last else 0]  # noqa: E731
    run_start = stamp("Started execution of run")
    run_end = stamp("Finished execution of run")
    # Ray Data creates the engine actors as the run's dataset starts executing: they import the
    # engine library and build at once; each says when it has started.
    launched = stamp(f"{label} for ")
    engines = pipeline.config.engine_pool_size
    build = launched
    started = [t for t, m in logs if m.startswith(f"{label} engine ") and " started in " in m]
    ready = started[min(engines, len(started)) - 1]
    generated = stamp("engine [", last=True)
    tokens = engine.metadata["generated_tokens"].value
    return {
        "rows": engine.metadata["rows_out"].value,
        "output_tokens": tokens,
        # From the engine actor's creation (it imports the engine library while the CPU stages run) to ready.
        "engine_start_s": ready - launched,
        "run_s": run_end - run_start,
        # When the engine build began, from the run's start (the target: <= 15 s at any partition count).
        "engine_build_after_run_start_s": build - run_start,
        "generate_s": generated - ready,
        "wall_s": run_end - PROCESS_START,
        "engine_starts": len(started),
        "engines": engines,
        "engine_placement": engine.metadata["engine_placement"].value
        if "engine_placement" in engine.metadata
        else None,
        "gpu_busy": monitor.gpu_busy_fraction(ready, generated),
        "gpu_util_mean": monitor.mean_gpu_util(ready, generated),
        "stage_log": [
            f"{t - PROCESS_START:7.1f} {m}" for t, m in logs if any(k in m for k in (*STAGE_LOG_KEYS, label))
        ],
    }


def raw_sglang(spec: dict, monitor: Monitor) -> dict:
    """SGLang's offline ``Engine.generate`` on the chat-templated token ids of all prompts at once."""
    import sglang
    from transformers import AutoTokenizer

    engine = sglang.Engine(model_path=spec["model"], load_format="dummy", context_length=2048, skip_tokenizer_init=True)
    ready = time.time()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    ids = [
        tokenizer.apply_chat_template(messages(row), add_generation_prompt=True, tokenize=True, return_dict=False)
        for row in read_rows(spec)
    ]
    generating = time.time()
    outputs = engine.generate(
        input_ids=ids, sampling_params={"max_new_tokens": spec["max_tokens"], "ignore_eos": True, "temperature": 0}
    )
    done = time.time()
    engine.shutdown()
    return {
        "rows": len(outputs),
        "output_tokens": sum(o["meta_info"]["completion_tokens"] for o in outputs),
        "engine_start_s": ready - PROCESS_START,
        "generate_s": done - generating,
        "wall_s": done - PROCESS_START,
        "gpu_busy": monitor.gpu_busy_fraction(generating, done),
        "gpu_util_mean": monitor.mean_gpu_util(generating, done),
    }


def llm_assets_in_process(spec: dict, monitor: Monitor) -> dict:
    """llm_assets with vLLM's engine core in the engine actor's process (the default up to
    sitting 7 and on the CPU build) instead of a process of its own, to compare both with raw
    vLLM in one sitting."""
    os.environ["ENGINE_ENV"] = ",".join(
        filter(None, [os.environ.get("ENGINE_ENV", ""), "VLLM_ENABLE_V1_MULTIPROCESSING=0"])
    )
    return llm_assets(spec, monitor)


SYSTEMS = {
    "raw_vllm": raw_vllm,
    "ray_data_llm": ray_data_llm,
    "llm_assets": llm_assets,
    "llm_assets_2gpu": llm_assets_2gpu,
    "llm_assets_in_process": llm_assets_in_process,
    "raw_sglang": raw_sglang,
    "llm_assets_sglang": llm_assets_sglang,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads(args.workload.read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llm_assets.engines.vllm import compat as vllm_compat

    # A smoke run without a GPU: vLLM's CPU build needs its environment (nothing on a GPU).
    os.environ.update(vllm_compat.platform_env(has_gpu()))
    profile_dir = args.out.with_suffix(".profile") if os.environ.get("PROFILE") == "1" else None
    with Monitor(profile_dir=profile_dir) as monitor:
        result = SYSTEMS[args.system](spec, monitor)
    result.update(
        system=args.system,
        host_peak_gib=monitor.host_peak_gib(),
        host_peak_processes=monitor.peak_processes,
        host_profile=monitor.profile,
        model=spec["size"],
        tensor_parallel_size=model_parallel().get("tensor_parallel_size", 1),
        pipeline_parallel_size=model_parallel().get("pipeline_parallel_size", 1),
    )
    result["output_tok_s"] = round(result["output_tokens"] / result["generate_s"], 1)
    result["whole_job_tok_s"] = round(result["output_tokens"] / result["wall_s"], 1)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "stage_log"}))
