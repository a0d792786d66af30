"""GPU paths, run on the H100 test machine (vLLM's CUDA build); skipped elsewhere."""

import importlib.util

import dagster as dg
import pytest

from llm_assets.demo import DATA_DIR, demo_pipeline, to_answer, to_chat
from llm_assets.testing import build_llama_model
from tests.helpers.pipelines import log_messages, make_resources, run_job

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def llama_1b(folder):
    """A 1B-class Llama config; the engine fills the weights with random values (no download)."""
    return build_llama_model(
        folder,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        vocab_size=32000,
        tokenizer_vocab=4096,
        dtype="bfloat16",
        with_weights=False,
    )


def run_demo_partition(pipeline, storage_root, capsys, shown: str):
    """The bundled prompts through ``pipeline``: its log lines and the engine's materialization."""
    resources = make_resources(storage_root)
    with dg.instance_for_test() as instance:
        result = run_job(pipeline, resources, instance, {"dagster/partition": "prompts.jsonl"})
        assert result.success
        messages = log_messages(instance, result.run_id)
        engine = instance.get_latest_materialization_event(dg.AssetKey(["demo", "engine"])).asset_materialization
    with capsys.disabled():
        print("\n".join(m for m in messages if shown in m))
        print({k: v.value for k, v in engine.metadata.items()})
    return messages, engine, resources["storage"].store()


def test_demo_pipeline_runs_its_engine_on_the_gpu_with_a_dummy_weight_llama(tmp_path, capsys):
    model = llama_1b(tmp_path / "llama-1b")
    pipeline = demo_pipeline(
        model_source=str(model),
        engine_kwargs={"load_format": "dummy", "max_model_len": 2048},
        runtime_env={"env_vars": {"LLM_ASSETS_COMPILE_CACHE": str(tmp_path / "compile-cache")}},
    )
    messages, engine, _ = run_demo_partition(pipeline, tmp_path / "storage", capsys, shown="engine")
    assert any("1 GPU(s) each, GPU build" in m for m in messages)
    assert sum("vLLM engine 0 started in" in m for m in messages) == 1
    assert engine.metadata["rows_out"].value == 20
    assert engine.metadata["generated_tokens"].value > 0
    # One GPU held from the engine actor's creation to its release: as long as the engine ran.
    assert engine.metadata["gpu_seconds"].value == engine.metadata["engine_seconds"].value > 0
    [placement] = engine.metadata["engine_placement"].value
    assert len(placement["gpu_ids"]) == 1 and any(f"GPU {placement['gpu_ids'][0]})" in m for m in messages)
    # CUDA graphs for the whole decode batch (vLLM's 1 024 sequences on an H100-class card), and
    # the compiled model kept in the node's (here the test's) compile cache for the next run.
    assert placement["cuda_graph_max_tokens"] == 1024
    assert placement["compile_cache"] == "compiled"
    assert list((tmp_path / "compile-cache" / "vllm" / "torch_compile_cache").iterdir())


@pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None, reason="SGLang is not installed (pip install sglang==0.5.15)"
)
def test_a_partition_through_the_sglang_engine(tmp_path, capsys):
    """Token ids in (Tokenize), token ids out, text from Detokenize: the vLLM engine's columns."""
    from transformers import AutoTokenizer

    from llm_assets import SGLangEngineProcessorConfig
    from llm_assets.pipeline import LLMPipeline
    from llm_assets.sources import LocalFolderSource

    model = llama_1b(tmp_path / "llama-1b")
    config = SGLangEngineProcessorConfig(
        model_source=str(model), engine_kwargs={"load_format": "dummy", "context_length": 2048}
    )
    pipeline = LLMPipeline("demo", config, LocalFolderSource(str(DATA_DIR)), preprocess=to_chat, postprocess=to_answer)
    messages, engine, storage = run_demo_partition(pipeline, tmp_path / "storage", capsys, shown="SGLang")
    assert sum("SGLang engine 0 started in" in m for m in messages) == 1
    assert engine.metadata["rows_out"].value == 20
    rows = [r for t in storage.read_committed("demo", "detokenize", "prompts.jsonl") for r in t.to_pylist()]
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    assert len(rows) == 20
    for row in rows:
        assert row["num_generated_tokens"] == len(row["generated_tokens"]) and 1 <= row["num_generated_tokens"] <= 64
        assert row["finish_reason"] in ("length", "stop") and row["num_input_tokens"] > 0
        assert row["generated_text"] == tokenizer.decode(row["generated_tokens"], skip_special_tokens=True)


def gpu_count() -> int:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    return len(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip().splitlines())


@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs (the 2- or 4-GPU test machine)")
@pytest.mark.parametrize("parallel", ["tensor_parallel_size", "pipeline_parallel_size"], ids=["tp2", "pp2"])
def test_a_model_parallel_engine_reserves_its_gpus_as_one_placement_group(parallel, tmp_path, capsys):
    """tensor_parallel_size=2 (or pipeline_parallel_size=2): one placement group of two
    {GPU: 1, CPU: 1} bundles, vLLM's Ray executor puts one worker on each GPU, and the engine
    stage counts two GPUs' seconds."""
    model = llama_1b(tmp_path / "llama-1b")
    from llm_assets.testing import TP_SAFE_ENGINE_KWARGS, TP_SAFE_ENV  # the test machines keep NVLink multicast off

    pipeline = demo_pipeline(
        model_source=str(model),
        engine_kwargs={"load_format": "dummy", "max_model_len": 2048, parallel: 2, **TP_SAFE_ENGINE_KWARGS},
        runtime_env={"env_vars": TP_SAFE_ENV},
    )
    messages, engine, _ = run_demo_partition(pipeline, tmp_path / "storage", capsys, shown="engine")
    assert any(
        "2 GPU(s) each, GPU build; each reserves a placement group of 2 x {'CPU': 1, 'GPU': 1} (PACK)" in m
        for m in messages
    )
    assert engine.metadata["rows_out"].value == 20 and engine.metadata["generated_tokens"].value > 0
    assert engine.metadata["gpu_seconds"].value == pytest.approx(2 * engine.metadata["engine_seconds"].value, abs=0.2)
    [placement] = engine.metadata["engine_placement"].value
    assert len(placement["bundle_nodes"]) == 2 and None not in placement["bundle_nodes"]


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="Qwen2-VL's video processor needs torchvision"
)
def test_video_and_image_tokens_reach_the_gpu_engine(tmp_path, media):
    """A tiny random Qwen2-VL (built here: its processor needs torchvision) on vLLM's CUDA build:
    one question alone, with an 80 x 60 PNG, and with the 8-frame 64 x 64 MP4 (by URL and by path).
    Tokenize's prompt holds one placeholder per medium; in the engine it becomes the medium's
    tokens: the PNG is resized to 56 x 84 (4 x 6 patches, merged 2 x 2: 6 tokens); of the clip
    (2 s at 4 frames a second) vLLM samples 2 frames a second, resized to 56 x 56 (4 frames in
    pairs: 2 x 2 x 2 = 8 tokens)."""
    from transformers import AutoTokenizer

    from llm_assets.pipeline import LLMPipeline
    from llm_assets.sources import LocalFolderSource
    from llm_assets.testing import build_qwen2_vl_model
    from tests.helpers.data import committed_rows, write_jsonl

    model = str(build_qwen2_vl_model(tmp_path / "tiny-qwen2-vl"))
    folder, base = media
    parts = {
        "a-none": None,
        "b-image": ("image_url", f"{base}/red.png"),
        "c-video_url": ("video_url", f"{base}/clip.mp4"),
        "d-video_path": ("video_url", str(folder / "clip.mp4")),
    }
    write_jsonl(tmp_path / "landing" / "clips.jsonl", [{"kind": kind} for kind in parts])

    def to_chat(row):
        content = [{"type": "text", "text": "What happens here?"}]
        if parts[row["kind"]]:
            kind, url = parts[row["kind"]]
            content.insert(0, {"type": kind, kind: {"url": url}})
        return {
            "kind": row["kind"],
            "messages": [{"role": "user", "content": content}],
            "sampling_params": {"max_tokens": 4, "temperature": 0},
        }

    limits = {"limit_mm_per_prompt": {"image": 1, "video": 1}}
    pipeline = LLMPipeline(
        "vlm",
        {
            "model_source": model,
            "engine_kwargs": {"max_model_len": 4096, "enforce_eager": True, **limits},
            "prepare_multimodal_stage": {"enabled": True, "model_config_kwargs": limits},
        },
        LocalFolderSource(str(tmp_path / "landing")),
        preprocess=to_chat,
    )
    resources = make_resources(tmp_path / "storage")
    with dg.instance_for_test() as instance:
        assert run_job(pipeline, resources, instance, {"dagster/partition": "clips.jsonl"}).success
    storage = resources["storage"].store()

    def rows(stage):
        return committed_rows(storage, "vlm", stage, "clips.jsonl", "kind")

    tokenizer = AutoTokenizer.from_pretrained(model)
    image, video = tokenizer.convert_tokens_to_ids("<|image_pad|>"), tokenizer.convert_tokens_to_ids("<|video_pad|>")
    prompts = [r["tokenized_prompt"] for r in rows("tokenize")]
    assert [(p.count(image), p.count(video)) for p in prompts] == [(0, 0), (1, 0), (0, 1), (0, 1)]
    tokens = [len(p) for p in prompts]
    engine = rows("engine")
    seen = [r["num_input_tokens"] for r in engine]
    # Each medium's placeholder and its wrapping tokens are in both counts; the engine's prompt has
    # the placeholder expanded to the medium's tokens.
    expected = [seen[0]] + [seen[0] + (tokens[i] - tokens[0]) - 1 + n for i, n in ((1, 6), (2, 8), (3, 8))]
    assert seen == expected, (tokens, seen)
    assert all(r.get("__inference_error__") == "" and r["num_generated_tokens"] == 4 for r in engine), engine
    assert [r["generated_text"] is not None for r in rows("postprocess")] == [True] * 4


SGLANG = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None, reason="SGLang is not installed (pip install sglang==0.5.15)"
)


def serve_engine_config(kind: str, model: str):
    """The engine a Serve app deploys: vLLM, or SGLang (its own test run: `-k sglang`)."""
    from llm_assets import SGLangEngineProcessorConfig, vLLMEngineProcessorConfig

    if kind == "SGLang":
        return SGLangEngineProcessorConfig(
            model_source=model, engine_kwargs={"load_format": "dummy", "context_length": 2048}
        )
    return vLLMEngineProcessorConfig(model_source=model, engine_kwargs={"load_format": "dummy", "max_model_len": 2048})


@pytest.mark.parametrize("kind", ["vLLM", pytest.param("SGLang", marks=SGLANG, id="sglang")])
def test_a_serve_app_on_the_gpu_serves_two_pipelines_with_one_engine(kind, tmp_path_factory, capsys):
    """An engine (vLLM, or SGLang) deployed as a Ray Serve app on a `ray start` cluster that
    outlives the runs: the first run deploys it, the second (another pipeline) reuses it and
    generates seconds after its start; both runs' timelines are printed. The response cache is
    off: the same prompts would otherwise be answered from it and never reach the engine."""
    from llm_assets import ServeDeploymentProcessorConfig
    from llm_assets.engines.serve import ServeEngine
    from llm_assets.pipeline import LLMPipeline
    from llm_assets.sources import LocalFolderSource
    from tests.helpers.serve import ray_cluster, resources_on, timeline

    tmp_path = tmp_path_factory.mktemp("serve-gpu")
    with ray_cluster(tmp_path_factory.mktemp("ray")) as address:
        model = llama_1b(tmp_path / "llama-1b")
        chat = ServeEngine(app_name="gpu_chat", engine=serve_engine_config(kind, str(model)), idle_timeout_s=60)
        pipelines = [
            LLMPipeline(
                name,
                ServeDeploymentProcessorConfig(engine=chat),
                LocalFolderSource(str(DATA_DIR)),
                preprocess=to_chat,
                postprocess=to_answer,
                response_cache="off",
            )
            for name in ("first", "second")
        ]
        resources = resources_on(address, tmp_path / "storage")
        marks = ("Serve app", "Serve engine 0 started", "engine [prompts.jsonl]: committed")
        with dg.instance_for_test() as instance:
            runs = [run_job(p, resources, instance, {"dagster/partition": "prompts.jsonl"}) for p in pipelines]
            assert all(run.success for run in runs)
            lines = [timeline(instance, run.run_id, marks) for run in runs]
            logs = [log_messages(instance, run.run_id) for run in runs]
            engines = [
                instance.get_latest_materialization_event(dg.AssetKey([p.name, "engine"])).asset_materialization
                for p in pipelines
            ]
        with capsys.disabled():
            for name, run_lines in zip(("run 1 (deploys)", "run 2 (reuses)"), lines):
                print(f"\n{name}:\n" + "\n".join(f"  {t:6.2f} s  {message}" for t, message in run_lines))
        assert sum(f"Serve app 'gpu_chat': deploying 1 {kind} replica(s)" in m for m in logs[0]) == 1
        assert sum(f"Serve app 'gpu_chat': reusing the running {kind} engine" in m for m in logs[1]) == 1
        assert [e.metadata["rows_out"].value for e in engines] == [20, 20]
        ready_2 = next(t for t, m in lines[1] if "Serve engine 0 started" in m)
        assert ready_2 < 10.0, lines[1]
