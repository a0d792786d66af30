"""The HTTP engine through real Dagster runs, against real servers on 127.0.0.1: a small server
that injects faults on demand (429 with Retry-After, 503, stalls past the timeout, dropped
connections: faults a real model server cannot be made to produce when asked), and vLLM's own
OpenAI-compatible server (`vllm serve`, the CPU build)."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import dagster as dg
import pytest
from aiohttp import web

from llm_assets.engines.http import HttpRequestProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from tests.conftest import free_port, questions, write_jsonl
from tests.test_pipeline_dagster import log_messages, make_resources, read_output, run_job

FAULTS = {1: "429", 2: "503", 3: "stall", 4: "drop"}  # by row number % 5, first attempt only
ALWAYS_FAILING = "q number 7"  # 503 on every attempt


class FaultServer:
    """A chat-completions endpoint that answers ``answer to <content>`` and logs every attempt."""

    def __init__(self, stall_s: float = 3.0):
        self.stall_s = stall_s
        self.attempts: dict[str, int] = defaultdict(int)
        self.arrivals: list[float] = []
        self.authorization: set = set()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the fault server did not start")

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/health", lambda request: web.Response(text="ok"))
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.loop.run_forever()

    async def _chat(self, request):
        body = await request.json()
        content = body["messages"][0]["content"]
        self.arrivals.append(time.time())
        self.authorization.add(request.headers.get("Authorization"))
        self.attempts[content] += 1
        number = int(content.split(":")[0].split()[-1])
        fault = FAULTS.get(number % 5) if self.attempts[content] == 1 else None
        if content.startswith(ALWAYS_FAILING + ":"):
            fault = "503"
        if fault == "429":
            return web.Response(status=429, text="slow down", headers={"Retry-After": "1"})
        if fault == "503":
            return web.Response(status=503, text="overloaded")
        if fault == "stall":
            await asyncio.sleep(self.stall_s)
        if fault == "drop":
            request.transport.close()
            return web.Response(status=500)
        return web.json_response({
            "model": body["model"],
            "choices": [{"message": {"role": "assistant", "content": f"answer to {content}"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3},
        })


def to_payload(row):
    return {"question": row["question"],
            "payload": {"model": "served", "messages": [{"role": "user", "content": row["question"]}], "max_tokens": 4}}


def to_answer(row):
    return {"question": row["question"], "answer": row["generated_text"], "tokens": row["num_generated_tokens"],
            "error": row.get("__inference_error__")}


def http_pipeline(folder, **config) -> LLMPipeline:
    return LLMPipeline("tiny", HttpRequestProcessorConfig(**config), LocalFolderSource(str(folder)),
                       preprocess=to_payload, postprocess=to_answer)


def test_every_row_once_through_retries_and_a_row_that_exhausts_them_kept_with_its_error(tmp_path, ray_session, instance):
    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(10))
    with FaultServer(stall_s=3.0) as server:
        pipeline = http_pipeline(tmp_path / "landing", url=server.url, max_retries=3, base_retry_wait_time_in_s=0.05,
                                 request_timeout_s=1.0, should_continue_on_error=True, batch_size=4, concurrency=2)
        result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"})
    assert result.success
    # Batches with and without a failed row differ in columns: the storage's reader unifies them.
    storage = make_resources(tmp_path / "storage")["storage"]
    rows = [row for table in storage.read_committed("tiny", "postprocess", "a.jsonl") for row in table.to_pylist()]
    assert sorted(r["question"] for r in rows) == sorted(q["question"] for q in questions(10))
    for row in rows:
        if row["question"].startswith(ALWAYS_FAILING + ":"):
            # Postprocess passes a failed row through untouched, its error kept.
            error = row["__inference_error__"]
            assert row["answer"] is None and "HTTP 503" in error and "after 4 attempts" in error
        else:
            assert row["answer"] == f"answer to {row['question']}" and row["tokens"] == 3 and row["error"] is None
    # Each faulty row was sent twice, the others once (nothing answered was sent again).
    expected = {q["question"]: 4 if q["question"].startswith(ALWAYS_FAILING + ":")
                else 2 if int(q["question"].split(":")[0].split()[-1]) % 5 in FAULTS else 1 for q in questions(10)}
    assert dict(server.attempts) == expected
    engine_materialization = next(
        e for e in instance.all_logs(result.run_id) if e.dagster_event and e.dagster_event.is_step_materialization
        and e.dagster_event.asset_key.path[-1] == "engine")
    metadata = engine_materialization.dagster_event.materialization.metadata
    assert metadata["retries"].value == sum(expected.values()) - 10
    assert metadata["errors"].value == 1
    assert not any("Authorization" in m for m in log_messages(instance, result.run_id))


def test_qps_is_one_rate_for_every_replica_of_the_run(tmp_path, ray_session, instance, monkeypatch):
    """Also: an API key given as dg.EnvVar is read from the run's environment, sent, and written
    to no log."""
    monkeypatch.setenv("LLM_ASSETS_TEST_API_KEY", "Bearer not-a-real-key")
    write_jsonl(tmp_path / "landing" / "a.jsonl", [{"question": f"q number {i * 5}: hi"} for i in range(41)])
    with FaultServer() as server:
        pipeline = http_pipeline(tmp_path / "landing", url=server.url, qps=10, batch_size=8, concurrency=2,
                                 headers={"Authorization": dg.EnvVar("LLM_ASSETS_TEST_API_KEY")})
        result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"})
    assert result.success
    arrivals = sorted(server.arrivals)
    assert len(arrivals) == 41
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    # Unpaced, this run's requests arrive at ~23/s on a 2-core machine.
    assert 9 <= rate <= 11, f"{rate:.1f} requests/s against qps=10"
    assert server.authorization == {"Bearer not-a-real-key"}
    assert not any("not-a-real-key" in m for m in log_messages(instance, result.run_id))


def test_a_row_without_a_payload_fails_preprocess_naming_the_row(tmp_path, ray_session, instance):
    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(3))
    pipeline = LLMPipeline("tiny", HttpRequestProcessorConfig(url="http://127.0.0.1:9/v1/chat/completions"),
                           LocalFolderSource(str(tmp_path / "landing")), preprocess=lambda row: {"messages": []})
    result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"}, raise_on_error=False)
    assert not result.success
    failure = next(e for e in instance.all_logs(result.run_id) if e.dagster_event and e.dagster_event.is_step_failure)
    assert "preprocess: row" in str(failure.dagster_event.step_failure_data.error) and "'payload'" in str(failure.dagster_event.step_failure_data.error)


@pytest.fixture(scope="module")
def vllm_server(tiny_model):
    """vLLM's OpenAI-compatible server (the CPU build) on the test model."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    log = open(Path(tiny_model).parent / "vllm-serve.log", "w")
    server = subprocess.Popen(
        # Not `vllm serve`: its CLI looks up the distribution "vllm", and the CPU build's is "vllm-cpu".
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model, "--served-model-name", "tiny",
         "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {server.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"vllm serve did not answer /health within 300 s; see {log.name}")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_a_partition_through_vllms_openai_server(tmp_path, ray_session, instance, vllm_server):
    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(6))

    def to_request(row):
        return {"question": row["question"], "payload": {
            "model": "tiny", "messages": [{"role": "user", "content": row["question"]}],
            "max_tokens": 4, "temperature": 0, "ignore_eos": True}}

    pipeline = LLMPipeline("tiny", HttpRequestProcessorConfig(url=f"{vllm_server}/v1/chat/completions", batch_size=4),
                           LocalFolderSource(str(tmp_path / "landing")), preprocess=to_request, postprocess=to_answer)
    result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"})
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"]
    rows = read_output(storage, "postprocess", "a.jsonl")
    assert Counter(r["question"] for r in rows) == Counter(q["question"] for q in questions(6))
    assert all(r["tokens"] == 4 and isinstance(r["answer"], str) and r["error"] is None for r in rows)
    engine_rows = read_output(storage, "engine", "a.jsonl")
    answers = [json.loads(r["http_response"]) for r in engine_rows]
    assert all(a["model"] == "tiny" and a["usage"]["completion_tokens"] == 4 for a in answers)
    assert all(r["num_input_tokens"] > 0 for r in engine_rows)


def test_config_errors_name_the_field_before_any_request():
    from llm_assets.engines.http import _headers

    with pytest.raises(ValueError, match="url 'localhost:8000/v1': expected an http"):
        HttpRequestProcessorConfig(url="localhost:8000/v1")
    with pytest.raises(ValueError, match="qps"):
        HttpRequestProcessorConfig(url="http://h/v1", qps=0)
    config = HttpRequestProcessorConfig(url="http://h/v1", headers={"Authorization": dg.EnvVar("LLM_ASSETS_UNSET_KEY")})
    with pytest.raises(ValueError, match=r"headers\['Authorization'\]: the environment variable 'LLM_ASSETS_UNSET_KEY' is not set"):
        _headers(config)
