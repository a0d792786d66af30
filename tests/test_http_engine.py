"""The HTTP engine through real Dagster runs, against real servers on 127.0.0.1: a small server
that injects faults on demand (429 with Retry-After, 503, stalls past the timeout, dropped
connections: faults a real model server cannot be made to produce when asked), and vLLM's own
OpenAI-compatible server (`vllm serve`, the CPU build)."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from llm_assets.engines.http import HttpRequestProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from tests.helpers.data import questions, write_jsonl
from tests.helpers.deployment import code_location_env
from tests.helpers.pipelines import RANGE_END, RANGE_START, log_messages, make_resources, read_output, run_job
from tests.helpers.processes import free_port
from tests.helpers.servers import (
    ALWAYS_FAILING,
    FAULTS,
    ODD_ANSWERS,
    FaultServer,
    StdlibChatServer,
    http_answer,
    to_payload,
)


def http_pipeline(folder, **config) -> LLMPipeline:
    return LLMPipeline(
        "tiny",
        HttpRequestProcessorConfig(**config),
        LocalFolderSource(str(folder)),
        preprocess=to_payload,
        postprocess=http_answer,
    )


def test_every_row_once_through_retries_and_a_row_that_exhausts_them_kept_with_its_error(
    tmp_path, ray_session, instance
):
    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(10))
    with FaultServer(stall_s=3.0) as server:
        pipeline = http_pipeline(
            tmp_path / "landing",
            url=server.url,
            max_retries=3,
            base_retry_wait_time_in_s=0.05,
            request_timeout_s=1.0,
            should_continue_on_error=True,
            batch_size=4,
            concurrency=2,
        )
        result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"})
    assert result.success
    # Batches with and without a failed row differ in columns: the storage's reader unifies them.
    storage = make_resources(tmp_path / "storage")["storage"].store()
    rows = [row for table in storage.read_committed("tiny", "postprocess", "a.jsonl") for row in table.to_pylist()]
    assert sorted(r["question"] for r in rows) == sorted(q["question"] for q in questions(10))
    for row in rows:
        if row["question"].startswith(ALWAYS_FAILING + ":"):
            # Postprocess passes a failed row through untouched, its error kept.
            error = row["__inference_error__"]
            assert row["answer"] is None and "HTTP 503" in error and "after 4 attempts" in error
        else:
            assert row["answer"] == f"answer to {row['question']}" and row["tokens"] == 3 and row["error"] == ""
    # Each faulty row was sent twice, the others once (nothing answered was sent again).
    expected = {
        q["question"]: 4
        if q["question"].startswith(ALWAYS_FAILING + ":")
        else 2
        if int(q["question"].split(":")[0].split()[-1]) % 5 in FAULTS
        else 1
        for q in questions(10)
    }
    assert dict(server.attempts) == expected
    engine_materialization = next(
        e
        for e in instance.all_logs(result.run_id)
        if e.dagster_event
        and e.dagster_event.is_step_materialization
        and e.dagster_event.asset_key.path[-1] == "engine"
    )
    metadata = engine_materialization.dagster_event.materialization.metadata
    assert metadata["retries"].value == sum(expected.values()) - 10
    assert metadata["errors"].value == 1
    assert not any("Authorization" in m for m in log_messages(instance, result.run_id))


def test_a_server_with_the_standard_librarys_listen_queue_answers_every_row_at_the_first_attempt(
    tmp_path, ray_session, instance
):
    """Two engine actors send three partitions' rows at once to a server written with Python's
    ``http.server``, which queues 5 connections: opened all at once, the connections it could not
    queue stalled for up to 31 s and came back as retries (6 of 120 rows, the run 7x slower) from a
    server that never failed. Opened a few at a time, every row is answered at its first attempt."""
    partitions = ["a.jsonl", "b.jsonl", "c.jsonl"]
    for name in partitions:
        write_jsonl(tmp_path / "landing" / name, questions(40, name[0]))
    with StdlibChatServer() as server:
        pipeline = http_pipeline(tmp_path / "landing", url=server.url, max_retries=3, concurrency=2)
        result = run_job(
            pipeline,
            make_resources(tmp_path / "storage"),
            instance,
            {RANGE_START: partitions[0], RANGE_END: partitions[-1]},
        )
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"].store()
    rows = [row for name in partitions for row in read_output(storage, "postprocess", name)]
    assert len(rows) == 120 and all(row["answer"] == f"answer to {row['question']}" for row in rows)
    engine = [
        e.dagster_event.materialization.metadata
        for e in instance.all_logs(result.run_id)
        if e.dagster_event
        and e.dagster_event.is_step_materialization
        and e.dagster_event.asset_key.path[-1] == "engine"
    ]
    assert [metadata["retries"].value for metadata in engine] == [0, 0, 0]
    assert server.requests == 120


def test_odd_answers_are_read_or_fail_their_own_row_only(tmp_path, ray_session, instance):
    """Answers servers and gateways send beside the usual chat completion (content as a list of
    parts, counts as floats or strings, an error object with status 200, bytes that are not UTF-8,
    ``Retry-After: inf``), mixed with good rows in the batches of two partitions: each is read into
    the engine's columns or fails its own row with what was wrong; the batch's other rows keep
    their answers."""
    odd = list(ODD_ANSWERS)  # odd[i]: the answer to partition a's question i (i < len(odd))

    def fault_for(content, attempt):
        number = int(content.split(":")[0].split()[-1])
        if not content.startswith("a ") or number >= len(odd):
            return None
        if odd[number] in ("infinite retry-after",) and attempt > 1:
            return None  # answered on the retry
        return odd[number]

    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(10, prefix="a"))
    write_jsonl(tmp_path / "landing" / "b.jsonl", questions(6, prefix="b"))
    with FaultServer(fault_for=fault_for) as server:
        pipeline = http_pipeline(
            tmp_path / "landing",
            url=server.url,
            max_retries=1,
            base_retry_wait_time_in_s=0.05,
            should_continue_on_error=True,
            batch_size=3,
            concurrency=2,
        )
        tags = {RANGE_START: "a.jsonl", RANGE_END: "b.jsonl"}
        result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, tags)
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"].store()
    rows = {row["question"].split(":")[0]: row for row in read_output(storage, "postprocess", "a.jsonl")}
    rows.update({row["question"].split(":")[0]: row for row in read_output(storage, "postprocess", "b.jsonl")})
    assert len(rows) == 16
    by_kind = {kind: rows[f"a number {i}"] for i, kind in enumerate(odd)}
    assert by_kind["content parts"]["answer"] == "parts" and by_kind["content parts"]["tokens"] == 3
    assert by_kind["float counts"]["tokens"] == 3 and by_kind["float counts"]["error"] == ""
    assert by_kind["string counts"]["tokens"] is None and by_kind["string counts"]["answer"].startswith("answer to")
    assert by_kind["tool call"]["answer"] is None and by_kind["tool call"]["error"] == ""
    assert by_kind["error object"]["__inference_error__"] == (
        f"the answer from {server.url} is an error: model overloaded (after 2 attempts)"
    )
    assert "is not valid utf-8 text (byte 41" in by_kind["not utf-8"]["__inference_error__"]
    assert by_kind["infinite retry-after"]["answer"].startswith("answer to")
    good = [row for key, row in rows.items() if not key.startswith("a number") or int(key.split()[-1]) >= len(odd)]
    assert len(good) == 9 and all(row["answer"] == f"answer to {row['question']}" for row in good)
    assert server.attempts[questions(10, prefix="a")[odd.index("error object")]["question"]] == 2


def test_qps_is_one_rate_for_every_replica_of_the_run(tmp_path, ray_session, instance, monkeypatch):
    """Also: an API key given as dg.EnvVar is read from the run's environment, sent, and written
    to no log."""
    monkeypatch.setenv("LLM_ASSETS_TEST_API_KEY", "Bearer not-a-real-key")
    write_jsonl(tmp_path / "landing" / "a.jsonl", [{"question": f"q number {i * 5}: hi"} for i in range(41)])
    with FaultServer() as server:
        pipeline = http_pipeline(
            tmp_path / "landing",
            url=server.url,
            qps=10,
            batch_size=8,
            concurrency=2,
            headers={"Authorization": dg.EnvVar("LLM_ASSETS_TEST_API_KEY")},
        )
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
    pipeline = LLMPipeline(
        "tiny",
        HttpRequestProcessorConfig(url="http://127.0.0.1:9/v1/chat/completions"),
        LocalFolderSource(str(tmp_path / "landing")),
        preprocess=lambda row: {"messages": []},
    )
    result = run_job(
        pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"}, raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in instance.all_logs(result.run_id) if e.dagster_event and e.dagster_event.is_step_failure)
    assert "preprocess: row" in str(failure.dagster_event.step_failure_data.error) and "'payload'" in str(
        failure.dagster_event.step_failure_data.error
    )


@pytest.fixture(scope="module")
def vllm_server(tiny_model):
    """vLLM's OpenAI-compatible server (the CPU build) on the test model."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    log = open(Path(tiny_model).parent / "vllm-serve.log", "w")
    server = subprocess.Popen(
        # Not `vllm serve`: its CLI looks up the distribution "vllm", and the CPU build's is "vllm-cpu".
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            tiny_model,
            "--served-model-name",
            "tiny",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "512",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
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


@pytest.mark.slow
def test_a_partition_through_vllms_openai_server(tmp_path, ray_session, instance, vllm_server):
    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(6))

    def to_request(row):
        return {
            "question": row["question"],
            "payload": {
                "model": "tiny",
                "messages": [{"role": "user", "content": row["question"]}],
                "max_tokens": 4,
                "temperature": 0,
                "ignore_eos": True,
            },
        }

    pipeline = LLMPipeline(
        "tiny",
        HttpRequestProcessorConfig(url=f"{vllm_server}/v1/chat/completions", batch_size=4),
        LocalFolderSource(str(tmp_path / "landing")),
        preprocess=to_request,
        postprocess=http_answer,
    )
    result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"})
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"].store()
    rows = read_output(storage, "postprocess", "a.jsonl")
    assert Counter(r["question"] for r in rows) == Counter(q["question"] for q in questions(6))
    assert all(r["tokens"] == 4 and isinstance(r["answer"], str) and r["error"] == "" for r in rows)
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
    with pytest.raises(
        ValueError, match=r"headers\['Authorization'\]: the environment variable 'LLM_ASSETS_UNSET_KEY' is not set"
    ):
        _headers(config)


def _max_in_window(arrivals: list[float], window_s: float) -> int:
    """The most arrivals in any half-open window [t, t + window_s)."""
    times = sorted(arrivals)
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def _random_faults(seed: int, always_failing: str, slow_down: str):
    """First attempts fail at random (about 1 in 4 with a 5xx, 1 in 8 stalled past the timeout), one
    row gets a 429 with Retry-After, one row fails every attempt; retries succeed."""
    import random

    chosen = random.Random(seed)
    first = {}

    def fault_for(content: str, attempt: int):
        if content.startswith(always_failing + ":"):
            return "503"
        if content.startswith(slow_down + ":"):
            return "429" if attempt == 1 else None
        if attempt > 1:
            return None
        if content not in first:
            draw = chosen.random()
            first[content] = (
                chosen.choice(["500", "502", "503", "504"]) if draw < 0.25 else "stall" if draw < 0.375 else None
            )
        return first[content]

    return fault_for


def test_retries_at_a_set_qps_keep_the_rate_honour_retry_after_and_count_exactly(tmp_path, ray_session, instance):
    """qps and retries together, as the README's own example sets them: 5xx at random, stalls past
    the timeout and a 429 with Retry-After, over several batches on two engine actors."""
    qps, rows = 5.0, 48
    write_jsonl(tmp_path / "landing" / "a.jsonl", questions(rows))
    with FaultServer(stall_s=2.5, fault_for=_random_faults(7, "q number 11", "q number 30")) as server:
        server.retry_after_s = 2
        pipeline = http_pipeline(
            tmp_path / "landing",
            url=server.url,
            qps=qps,
            max_retries=3,
            base_retry_wait_time_in_s=0.2,
            request_timeout_s=1.0,
            should_continue_on_error=True,
            batch_size=8,
            concurrency=2,
        )
        result = run_job(pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "a.jsonl"})
    assert result.success
    storage = make_resources(tmp_path / "storage")["storage"].store()
    engine_rows = read_output(storage, "engine", "a.jsonl")
    assert sorted(r["row_id"] for r in engine_rows) == sorted(f"a.jsonl:{i}" for i in range(rows))  # each row once
    faults = Counter(fault for *_, fault in server.log)
    assert faults["stall"] and sum(faults[s] for s in ("500", "502", "503", "504")) > 4 and faults["429"] == 1, faults
    for row in engine_rows:
        content = json.loads(row["payload"])["messages"][0]["content"]
        # Retries counted exactly: every attempt the server saw past the first.
        assert row["http_retries"] == server.attempts[content] - 1, content
        if content.startswith("q number 11:"):
            assert row["generated_text"] is None and "after 4 attempts" in row["__inference_error__"]
        else:
            assert row["generated_text"] == f"answer to {content}" and row["__inference_error__"] == ""
    # The limit held through the retries: no 10 s window saw more than qps * 10 requests (5 % slack).
    assert _max_in_window(server.arrivals, 10.0) <= 1.05 * qps * 10
    # Retry-After honoured: the 429's row came back no sooner than the server asked.
    slow_down = sorted(t for content, _, t, _ in server.log if content.startswith("q number 30:"))
    assert len(slow_down) == 2 and slow_down[1] - slow_down[0] >= server.retry_after_s
    metadata = next(
        e
        for e in instance.all_logs(result.run_id)
        if e.dagster_event
        and e.dagster_event.is_step_materialization
        and e.dagster_event.asset_key.path[-1] == "engine"
    ).dagster_event.materialization.metadata
    assert metadata["retries"].value == len(server.log) - rows


HTTP_DEFINITIONS = """\
import os

from llm_assets.defs.factory import build_definitions
from llm_assets.engines.http import HttpRequestProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource
from llm_assets.resources import PartitionStorage, make_resources
from tests.helpers.servers import http_answer, to_payload

config = HttpRequestProcessorConfig(
    url=os.environ["PACING_URL"], qps=float(os.environ["PACING_QPS"]), batch_size=4, concurrency=2
)
landing = LocalFolderSource(os.environ["PACING_LANDING"])
PIPELINES = [LLMPipeline("paced", config, landing, preprocess=to_payload, postprocess=http_answer)]
defs = build_definitions(PIPELINES, make_resources(PartitionStorage(root=os.environ["PACING_STORAGE"])))
"""


@pytest.mark.slow
def test_two_runs_against_one_endpoint_share_its_qps(tmp_path):
    """Two `dagster job execute` processes at once, each with its own Ray and two engine actors,
    against one server: their requests together keep the endpoint's qps."""

    qps, rows = 4.0, 40
    defs = tmp_path / "paced_defs.py"
    defs.write_text(HTTP_DEFINITIONS)
    with FaultServer(fault_for=lambda content, attempt: None) as server:
        processes = []
        for name in ("one", "two"):
            folder = tmp_path / name
            write_jsonl(folder / "landing" / "a.jsonl", questions(rows, name))
            (folder / "home").mkdir()
            env = {
                **os.environ,
                **code_location_env(folder / "home", "PACING", folder / "landing", folder / "storage", "unused"),
                "PACING_URL": server.url,
                "PACING_QPS": str(qps),
            }
            subprocess.run(
                [sys.executable, "-m", "llm_assets.cli", "add-partitions", "-f", str(defs)],
                env=env,
                check=True,
                capture_output=True,
                cwd=folder,
            )
            processes.append((env, folder))
        running = []
        for env, folder in processes:  # launched together
            log = open(folder / "run.log", "w")
            running.append(
                (
                    subprocess.Popen(
                        [
                            "dagster",
                            "job",
                            "execute",
                            "-f",
                            str(defs),
                            "-j",
                            "paced_job",
                            "--tags",
                            '{"dagster/partition": "a.jsonl"}',
                        ],
                        env=env,
                        cwd=folder,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                    folder,
                )
            )
        for process, folder in running:
            assert process.wait(timeout=300) == 0, (folder / "run.log").read_text()[-3000:]
    assert len(server.arrivals) == 2 * rows
    # Both runs were sending at once (else this would test nothing): each run's engine actors
    # started (logged to the second) while requests were still being sent.
    last_request = max(server.arrivals)
    for _, folder in running:
        line = next(line for line in (folder / "run.log").read_text().splitlines() if ": 2 engine actor(s) (" in line)
        started = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) - time.timezone
        assert started < last_request - 5, (
            f"{folder.name}'s engines started {last_request - started:.1f} s before the last request"
        )
    # Unshared, each run sends at qps and the overlap doubles the rate.
    assert _max_in_window(server.arrivals, 10.0) <= 1.05 * qps * 10
    rate = (len(server.arrivals) - 1) / (last_request - min(server.arrivals))
    assert rate <= 1.05 * qps, f"{rate:.2f} requests/s against qps={qps} for both runs together"
