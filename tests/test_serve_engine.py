"""Ray Serve deployments as the engine, on a real Ray cluster that outlives the runs (`ray start
--head` on this machine, stopped by its process group at the end), real Ray Serve, the real vLLM
CPU engine and real Dagster runs connected with ``RayDataResource(address=...)``.

- Two pipelines, a two-turn conversation whose turn 2 continues turn 1's answers, share one
  engine deployed as a Serve app: one model load for both, and the second run generates seconds
  after its start; the app deletes itself after its idle timeout.
- A deployment of the user's own, called row by row as ray.data.llm does (method, dtype,
  request_kwargs): bad rows, an unknown deployment and a failing request.
"""

import asyncio
import re
import time
from pathlib import Path

import dagster as dg
import pytest
from pydantic import BaseModel

from llm_assets import ServeDeploymentProcessorConfig, vLLMEngineProcessorConfig
from llm_assets.engines.serve import ServeEngine
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from llm_assets.storage import PartitionStore
from tests.helpers.data import questions, write_jsonl
from tests.helpers.pipelines import log_messages, run_job, to_chat
from tests.helpers.serve import ray_cluster, resources_on, timeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_S = 15.0
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ray_cluster(tmp_path_factory.mktemp("ray")) as address:
        yield address


# --- an engine of ours, deployed once, shared by two pipelines -------------------------------


def second_turn(row):
    return {
        "question": row["question"],
        "answer": row["answer"],
        "messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
            {"role": "user", "content": "Say more."},
        ],
        "sampling_params": {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0},
    }


def answer(row):
    return {"question": row["question"], "answer": row["generated_text"], "tokens": row["num_generated_tokens"]}


def direct_vllm(model: str, batches: list) -> list[list[list[int]]]:
    """Raw vLLM on the same token ids (the vLLM replica class, no Serve, no pipeline)."""
    from llm_assets.engines.vllm import compat
    from llm_assets.engines.vllm.replica import vLLMEngineStage

    stage = vLLMEngineStage(
        model_source=model,
        engine_kwargs=compat.platform_engine_kwargs({"max_model_len": 512}, False),
        engine_detokenizes=False,
    )
    tokens = [asyncio.run(stage.process(batch)).column("generated_tokens").to_pylist() for batch in batches]
    stage.shutdown()
    return tokens


@pytest.fixture(scope="module")
def two_turns(cluster, tiny_model, tmp_path_factory):
    import pyarrow.parquet as pq
    import ray
    from ray import serve

    from llm_assets.engines.vllm import compat

    root = tmp_path_factory.mktemp("serve")
    chat = ServeEngine(
        app_name="chat",
        engine=vLLMEngineProcessorConfig(model_source=tiny_model, engine_kwargs={"max_model_len": 512}, batch_size=4),
        idle_timeout_s=IDLE_TIMEOUT_S,
    )
    turn1 = LLMPipeline(
        "turn1",
        ServeDeploymentProcessorConfig(engine=chat, batch_size=4),
        LocalFolderSource(str(root / "turn1")),
        preprocess=to_chat,
        postprocess=answer,
    )
    turn2 = LLMPipeline(
        "turn2",
        ServeDeploymentProcessorConfig(engine=chat, batch_size=4),
        LocalFolderSource(str(root / "turn2")),
        preprocess=second_turn,
        postprocess=answer,
    )
    resources = resources_on(cluster, root / "storage")
    storage = resources["storage"].store()
    write_jsonl(root / "turn1" / "chat.jsonl", questions(6))
    with dg.instance_for_test() as instance:
        first = run_job(turn1, resources, instance, {"dagster/partition": "chat.jsonl"})
        # Turn 2's input is turn 1's output: each question with its answer.
        first_rows = [
            row for table in storage.read_committed("turn1", "postprocess", "chat.jsonl") for row in table.to_pylist()
        ]
        write_jsonl(
            root / "turn2" / "chat.jsonl", [{"question": r["question"], "answer": r["answer"]} for r in first_rows]
        )
        second = run_job(turn2, resources, instance, {"dagster/partition": "chat.jsonl"})
        if not ray.is_initialized():
            ray.init(address=cluster, namespace="llm_assets_tests")
        after_runs = serve.status().applications.get("chat")
        replicas_after_runs = after_runs.deployments["engine"].replica_states if after_runs else None
        # Raw vLLM on the token ids Tokenize wrote, while the app waits out its idle timeout.
        tokenized = [
            pq.read_table(storage.committed_files(name, "tokenize", "chat.jsonl")) for name in ("turn1", "turn2")
        ]
        direct = ray.remote(direct_vllm).options(num_cpus=1, runtime_env={"env_vars": compat.engine_actor_env(False)})
        reference = ray.get(direct.remote(tiny_model, tokenized))
        deadline = time.monotonic() + IDLE_TIMEOUT_S + 30
        while "chat" in serve.status().applications and time.monotonic() < deadline:
            time.sleep(1)
        yield {
            "instance": instance,
            "runs": (first, second),
            "storage": storage,
            "reference": reference,
            "replicas_after_runs": replicas_after_runs,
            "app_after_idle": serve.status().applications.get("chat"),
            "first_rows": first_rows,
        }


def test_two_pipelines_share_one_engine_deployed_once(two_turns):
    instance, runs = two_turns["instance"], two_turns["runs"]
    assert all(run.success for run in runs)
    logs = [log_messages(instance, run.run_id) for run in runs]
    assert sum("Serve app 'chat': deploying 1 vLLM replica(s)" in m for m in logs[0]) == 1
    assert any("it outlives this run on the Ray cluster" in m for m in logs[0])
    assert sum("Serve app 'chat': reusing the running vLLM engine" in m for m in logs[1]) == 1
    assert not any("deploying" in m for m in logs[1])
    # Both runs' engine clients report the one Serve replica that built the engine (its pid).
    started = [[m for m in run_logs if "Serve engine 0 started in" in m] for run_logs in logs]
    assert [len(lines) for lines in started] == [1, 1]
    assert started[0][0].split("(pid ")[1] == started[1][0].split("(pid ")[1]
    # The runs' pools hold clients only: no vLLM engine actor started in either run.
    assert not any("vLLM engine" in m and "started in" in m for run_logs in logs for m in run_logs)
    assert any(m.startswith("Serve for ") and ": 1 engine actor(s) (0 GPU(s) each" in m for m in logs[0])
    assert [state for state, count in two_turns["replicas_after_runs"].items() if count] == ["RUNNING"]
    assert two_turns["replicas_after_runs"]["RUNNING"] == 1


def test_every_row_once_and_the_same_tokens_as_raw_vllm(two_turns):
    storage = two_turns["storage"]
    for name, reference in zip(("turn1", "turn2"), two_turns["reference"]):
        engine = [row for table in storage.read_committed(name, "engine", "chat.jsonl") for row in table.to_pylist()]
        assert sorted(r["row_id"] for r in engine) == [f"chat.jsonl:{i}" for i in range(6)]
        assert engine[0]["__inference_error__"] == "" and "generated_text" not in engine[0]  # the vLLM engine's columns
        assert [r["generated_tokens"] for r in sorted(engine, key=lambda r: r["row_id"])] == reference
        output = [
            row for table in storage.read_committed(name, "postprocess", "chat.jsonl") for row in table.to_pylist()
        ]
        assert all(r["tokens"] == MAX_TOKENS and isinstance(r["answer"], str) for r in output)
    turn2 = [
        row for table in storage.read_committed("turn2", "chat_template", "chat.jsonl") for row in table.to_pylist()
    ]
    first = {r["question"]: r["answer"] for r in two_turns["first_rows"]}
    # Turn 2's prompt carries turn 1's answer before the follow-up.
    assert all(f"{first[r['question']]}<|im_end|>\n<|im_start|>user\nSay more." in r["prompt"] for r in turn2)


def test_the_second_run_generates_seconds_after_its_start_and_the_app_goes_when_idle(two_turns):
    instance, runs = two_turns["instance"], two_turns["runs"]
    marks = (
        "Serve app",
        "Serve engine 0 started",
        "engine [chat.jsonl]: committed",
        "postprocess [chat.jsonl]: committed",
    )
    lines = [timeline(instance, run.run_id, marks) for run in runs]
    for name, run_lines in zip(("run 1 (deploys)", "run 2 (reuses)"), lines):
        print(f"\n{name}:\n" + "\n".join(f"  {t:6.2f} s  {message}" for t, message in run_lines))
    committed_1, committed_2 = (
        next(t for t, m in run_lines if "engine [chat.jsonl]: committed" in m) for run_lines in lines
    )
    # The second run loads no model: it connects to the running app, and has its answers
    # committed sooner after its start than the first run, which built the engine first (both
    # timed in this test, on this machine). Not "before the first run's engine was ready": on a
    # loaded 2-core host six rows took 15 s to generate, longer than the build.
    assert "reusing the running vLLM engine" in lines[1][0][1]
    started_in = [
        float(re.search(r"Serve engine 0 started in ([\d.]+) s", m).group(1))
        for run_lines in lines
        for _, m in run_lines
        if "Serve engine 0 started" in m
    ]
    assert started_in[1] < 1.0 < started_in[0], started_in
    assert committed_2 < committed_1, lines
    assert two_turns["app_after_idle"] is None  # deleted by its keeper after IDLE_TIMEOUT_S without runs


# --- a deployment of the user's own, called row by row (ray.data.llm's contract) -------------


class EchoRequest(BaseModel):
    text: str
    request_id: str
    idx_in_batch: int


class Echo:
    async def chat(self, request: EchoRequest):
        if request.text == "fail":
            raise ValueError("this request fails")
        yield {
            "choices": [{"message": {"content": f"echo {request.text}"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        }


def echo_row(row):
    return {
        "question": row["question"],
        "method": "chat",
        "dtype": "EchoRequest",
        "request_kwargs": {"text": row["question"]},
    }


@pytest.fixture(scope="module")
def echo_app(cluster):
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=cluster, namespace="llm_assets_tests")
    serve.start(proxy_location="Disabled")
    serve.run(serve.deployment(Echo).bind(), name="echo", route_prefix=None)
    yield "echo"
    serve.delete("echo")


def echo_pipeline(folder, preprocess=echo_row, **config) -> LLMPipeline:
    settings = {
        "app_name": "echo",
        "deployment_name": "Echo",
        "dtype_mapping": {"EchoRequest": EchoRequest},
        "batch_size": 4,
    }
    return LLMPipeline(
        "echo",
        ServeDeploymentProcessorConfig(**{**settings, **config}),
        LocalFolderSource(str(folder)),
        preprocess=preprocess,
    )


def failure_headline(result) -> str:
    error = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error
    return (error.cause or error).message.splitlines()[0]


def test_rows_call_the_method_with_their_dtype_and_a_failing_request_is_kept_with_its_error(
    cluster, echo_app, tmp_path, instance
):
    write_jsonl(tmp_path / "landing" / "x.jsonl", [*questions(3), {"question": "fail"}])
    pipeline = echo_pipeline(tmp_path / "landing", should_continue_on_error=True)
    result = run_job(pipeline, resources_on(cluster, tmp_path / "storage"), instance, {"dagster/partition": "x.jsonl"})
    assert result.success
    storage = PartitionStore(root=str(tmp_path / "storage"))
    rows = {
        r["question"]: r
        for table in storage.read_committed("echo", "postprocess", "x.jsonl")
        for r in table.to_pylist()
    }
    assert sorted(r["row_id"] for r in rows.values()) == [f"x.jsonl:{i}" for i in range(4)]
    for question in (q["question"] for q in questions(3)):
        assert (
            rows[question]["generated_text"] == f"echo {question}" and rows[question]["__inference_error__"] == ""
        )  # as ray.data.llm writes a good row
        assert '"finish_reason": "stop"' in rows[question]["serve_response"]
    failed = rows["fail"]
    assert "ValueError: this request fails" in failed["__inference_error__"] and failed["serve_response"] is None


def test_a_row_without_method_or_request_kwargs_fails_preprocess_naming_it(cluster, echo_app, tmp_path, instance):
    write_jsonl(tmp_path / "landing" / "x.jsonl", questions(3))

    def missing_kwargs(row):
        return {**echo_row(row), "request_kwargs": None} if row["question"].startswith("q number 1:") else echo_row(row)

    result = run_job(
        echo_pipeline(tmp_path / "landing", preprocess=missing_kwargs),
        resources_on(cluster, tmp_path / "storage"),
        instance,
        {"dagster/partition": "x.jsonl"},
        raise_on_error=False,
    )
    headline = failure_headline(result)
    assert "preprocess: row 'x.jsonl:1': 'request_kwargs' is missing" in headline, headline
    write_jsonl(tmp_path / "landing2" / "x.jsonl", questions(2))
    result = run_job(
        echo_pipeline(
            tmp_path / "landing2", preprocess=lambda row: {"question": row["question"], "request_kwargs": {}}
        ),
        resources_on(cluster, tmp_path / "storage2"),
        instance,
        {"dagster/partition": "x.jsonl"},
        raise_on_error=False,
    )
    assert "preprocess: row 'x.jsonl:0': has no 'method'" in failure_headline(result)


def test_an_unknown_deployment_fails_the_run_at_its_start(cluster, echo_app, tmp_path, instance):
    write_jsonl(tmp_path / "landing" / "x.jsonl", questions(2))
    result = run_job(
        echo_pipeline(tmp_path / "landing", deployment_name="Nope"),
        resources_on(cluster, tmp_path / "storage"),
        instance,
        {"dagster/partition": "x.jsonl"},
        raise_on_error=False,
    )
    headline = failure_headline(result)
    assert "Serve app 'echo' has no deployment 'Nope' (its deployments: Echo)" in headline, headline
    assert not (tmp_path / "storage" / "echo" / "engine").exists()
