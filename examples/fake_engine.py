"""A test of your own pipeline's row functions and orchestration on the fake engine (no vLLM, no GPU).

`python examples/fake_engine.py` runs it once: a tokenizer-only model folder built offline, one
landed file, every stage in one Dagster run on a local Ray.
"""

import json
import sys
import tempfile
from pathlib import Path

import dagster as dg

from llm_assets import LLMPipeline, LocalFolderSource
from llm_assets.engines.fake import FakeEngineProcessorConfig


def preprocess(row):
    messages = [{"role": "user", "content": row["question"]}]
    return {"question": row["question"], "messages": messages, "sampling_params": {"max_tokens": 8}}


def postprocess(row):
    return {"question": row["question"], "answer": row["generated_text"], "tokens": row["num_generated_tokens"]}


def fake_pipeline(model_folder: str, landing: str) -> LLMPipeline:
    config = FakeEngineProcessorConfig(  # a vLLM config's fields, plus start_delay_s and batch_delay_s
        model_source=model_folder,  # a folder with a tokenizer (no weights needed)
        engine_kwargs={"max_model_len": 512},  # a longer prompt fails its row, as in vLLM
        batch_size=4,
    )
    return LLMPipeline("qa", config, LocalFolderSource(landing), preprocess=preprocess, postprocess=postprocess)


def run_once(root: Path) -> list[dict]:
    from llm_assets.defs.factory import add_partitions_for_new_files, build_definitions
    from llm_assets.resources import PartitionStorage, make_resources
    from llm_assets.testing import build_llama_model

    model = build_llama_model(root / "model", with_weights=False)
    (root / "landing").mkdir(parents=True)
    rows = [{"question": f"Question {i}?"} for i in range(10)]
    (root / "landing" / "part-1.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pipeline = fake_pipeline(str(model), str(root / "landing"))
    resources = make_resources(PartitionStorage(root=str(root / "storage")))
    with dg.instance_for_test() as instance:
        add_partitions_for_new_files(instance, pipeline)
        job = build_definitions([pipeline], resources).resolve_job_def("qa_job")
        job.execute_in_process(instance=instance, tags={"dagster/partition": "part-1.jsonl"})
    tables = resources["storage"].store().read_committed("qa", "postprocess", "part-1.jsonl")
    return [row for table in tables for row in table.to_pylist()]


# What a test can assert: every row answered, with the tokens asked for (the fake engine is deterministic).
pipeline = fake_pipeline("Qwen/Qwen2.5-0.5B-Instruct", "/data/questions")

if __name__ == "__main__":
    answers = run_once(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="llm-assets-fake-")))
    assert len(answers) == 10 and all(row["tokens"] == 8 for row in answers), answers
    print(f"{len(answers)} rows, e.g. {answers[0]}")
