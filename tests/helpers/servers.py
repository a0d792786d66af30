"""Servers tests run on 127.0.0.1: an OpenAI-compatible endpoint that injects faults on demand
(faults a real model server cannot be made to produce when asked)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiohttp import web

from tests.helpers.processes import free_port

FAULTS = {1: "429", 2: "503", 3: "stall", 4: "drop"}  # by row number % 5, first attempt only
ALWAYS_FAILING = "q number 7"  # 503 on every attempt


def _chat_answer(content, **changes) -> bytes:
    answer = {
        "choices": [{"message": {"role": "assistant", "content": f"answer to {content}"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3},
    }
    answer["choices"][0]["message"].update(changes.pop("message", {}))
    answer.update(changes)
    return json.dumps(answer).encode()


# Answers real servers and gateways send that are not the usual chat completion: (status, headers, body).
ODD_ANSWERS = {
    "content parts": lambda c: (200, {}, _chat_answer(c, message={"content": [{"type": "text", "text": "parts"}]})),
    "float counts": lambda c: (200, {}, _chat_answer(c, usage={"prompt_tokens": 5.0, "completion_tokens": 3.0})),
    "string counts": lambda c: (200, {}, _chat_answer(c, usage={"prompt_tokens": "5", "completion_tokens": "x"})),
    "tool call": lambda c: (200, {}, _chat_answer(c, message={"content": None, "tool_calls": [{"id": "t"}]})),
    "error object": lambda c: (200, {}, json.dumps({"error": {"message": "model overloaded", "code": 503}}).encode()),
    "not utf-8": lambda c: (200, {}, b'{"choices": [{"message": {"content": "caf\xe9"}}]}'),
    "infinite retry-after": lambda c: (429, {"Retry-After": "inf"}, b"slow down"),
}


def table_fault(content: str, attempt: int):
    if content.startswith(ALWAYS_FAILING + ":"):
        return "503"
    number = int(content.split(":")[0].split()[-1])
    return FAULTS.get(number % 5) if attempt == 1 else None


class FaultServer:
    """A chat-completions endpoint that answers ``answer to <content>`` and logs every attempt."""

    retry_after_s = 1

    def __init__(self, stall_s: float = 3.0, fault_for=None):
        """``fault_for(content, attempt) -> "429" | "5xx" | "stall" | "drop" | an ODD_ANSWERS name |
        None``: the fault of one attempt (attempts counted from 1); by default the FAULTS table's."""
        self.stall_s = stall_s
        self.fault_for = fault_for or table_fault
        self.attempts: dict[str, int] = defaultdict(int)
        self.arrivals: list[float] = []
        self.log: list[tuple[str, int, float, str | None]] = []  # (content, attempt, arrival, fault)
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
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.loop.run_forever()

    async def _health(self, request):
        return web.Response(text="ok")

    async def _chat(self, request):
        body = await request.json()
        content = body["messages"][0]["content"]
        self.arrivals.append(time.time())
        self.authorization.add(request.headers.get("Authorization"))
        self.attempts[content] += 1
        fault = self.fault_for(content, self.attempts[content])
        self.log.append((content, self.attempts[content], self.arrivals[-1], fault))
        if fault in ODD_ANSWERS:
            status, headers, body = ODD_ANSWERS[fault](content)
            return web.Response(status=status, headers={"Content-Type": "application/json", **headers}, body=body)
        if fault == "429":
            return web.Response(status=429, text="slow down", headers={"Retry-After": str(self.retry_after_s)})
        if fault in ("500", "502", "503", "504"):
            return web.Response(status=int(fault), text="overloaded")
        if fault == "stall":
            await asyncio.sleep(self.stall_s)
        if fault == "drop":
            request.transport.close()
            return web.Response(status=500)
        return web.json_response(
            {
                "model": body["model"],
                "choices": [
                    {"message": {"role": "assistant", "content": f"answer to {content}"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3},
            }
        )


class StdlibChatServer:
    """A chat-completions endpoint as a user writes one with Python's ``http.server``: a thread per
    connection, keep-alive, and the standard library's listen queue of 5 connections. It never
    fails; ``requests`` counts what it answered."""

    def __init__(self):
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                content = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
                server.requests += 1
                body = _chat_answer(content)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        assert self.httpd.request_queue_size == 5  # the standard library's default, the point here
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"


def to_payload(row):
    """An HTTP pipeline's preprocess: the question as a chat request body."""
    return {
        "question": row["question"],
        "payload": {"model": "served", "messages": [{"role": "user", "content": row["question"]}], "max_tokens": 4},
    }


def http_answer(row):
    """An HTTP pipeline's postprocess: the answer, its token count and the row's error."""
    return {
        "question": row["question"],
        "answer": row["generated_text"],
        "tokens": row["num_generated_tokens"],
        "error": row.get("__inference_error__"),
    }
