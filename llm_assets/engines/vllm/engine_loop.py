"""vLLM's engine stepped by one thread of this process, awaited from asyncio.

The engine is vLLM's ``LLMEngine``, what the offline ``LLM`` class drives (``AsyncLLM``, the
server's engine, adds an output-handler task per request and never runs its core in-process).
One thread owns it (it is not thread-safe): it admits new requests, calls ``step()`` while any
request is unfinished, and hands each finished output to the asyncio task waiting for it.

Where its core runs is ``VLLM_ENABLE_V1_MULTIPROCESSING`` (compat.engine_actor_env sets it per
platform). ``1``, the GPU default: in a process of its own, as raw vLLM's ``LLM`` runs it; the core
schedules and keeps the GPU fed while this thread only admits requests and hands back outputs.
Inside a Ray actor vLLM would *spawn* that process (forking a Ray worker is unsafe) and import
vLLM and torch a second time; core_process.py forks it instead from a server that imported them
while the actor did. ``0``, the CPU default: the core in this process, no second process; this
thread then also schedules and runs every step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import defaultdict
from typing import Any, Optional


class EngineLoop:
    def __init__(self, engine_args: Any, usage_context: Any, stat_loggers: Optional[list] = None):
        from vllm.v1.engine.llm_engine import LLMEngine

        self._engine = LLMEngine.from_engine_args(engine_args, usage_context=usage_context, stat_loggers=stat_loggers)
        self.vllm_config = self._engine.vllm_config
        # (request_id, prompt, params, lora_request, loop, future), a _Group, an abort (a request
        # id), or an _EngineCall
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[str, Any] = {}  # request id -> (loop, future), or the _Group it belongs to
        self._wake = threading.Event()
        self._stopping = False
        self.dead: Optional[BaseException] = None
        # Where the loop's time goes (seconds), reported when the engine shuts down: stepping
        # includes waiting for the GPU; admitting and handing back are the loop's own overhead.
        self.timings = {"steps": 0, "stepping_s": 0.0, "admitting_s": 0.0, "handing_back_s": 0.0, "idle_s": 0.0}
        # From the first request admitted to the last output handed back: idle_s also counts the
        # wait before the first batch and after the last, which this window leaves out.
        self._first_request_at: Optional[float] = None
        self._last_output_at: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name="vllm-engine-loop", daemon=True)
        self._thread.start()

    @property
    def errored(self) -> bool:
        return self.dead is not None

    async def generate(self, prompt: Any, params: Any, request_id: str, lora_request: Any = None) -> Any:
        """The request's final ``RequestOutput``; a request vLLM refuses raises its error."""
        future = self._new_future()
        self._inbox.put((request_id, prompt, params, lora_request, asyncio.get_running_loop(), future))
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            self._inbox.put(request_id)  # abort: nobody waits for it any more
            self._wake.set()
            raise

    async def generate_all(self, requests: list[tuple[str, Any, Any, Any]]) -> list[Any]:
        """Each request's final output, or the exception that failed it, in order, for
        (request_id, prompt, params, lora_request) tuples: one hand-over and one wake-up for the
        lot. Pooling rows finish in one step, thousands a second, and a task and a future per row
        cost the actor's event loop as much as the engine's admission did."""
        if not requests:
            return []
        group = _Group(requests, asyncio.get_running_loop(), self._new_future())
        self._inbox.put(group)
        self._wake.set()
        try:
            return await group.future
        except asyncio.CancelledError:
            for request_id, *_ in requests:
                self._inbox.put(request_id)
            self._wake.set()
            raise

    async def add_lora(self, lora_request: Any) -> None:
        """Load a LoRA adapter into the engine now, on the engine's thread (it is not thread-safe):
        an adapter vLLM refuses raises here, where loading it with a request's first step would
        take the engine down."""
        future = self._new_future()
        self._inbox.put(_EngineCall(lambda engine: engine.add_lora(lora_request), asyncio.get_running_loop(), future))
        self._wake.set()
        await future

    def _new_future(self) -> asyncio.Future:
        if self.dead is not None:
            raise _dead_error(self.dead)
        if self._stopping:
            raise RuntimeError("the vLLM engine was shut down")
        return asyncio.get_running_loop().create_future()

    def report(self) -> dict[str, float]:
        """Where the loop's time went so far."""
        timings = dict(self.timings)
        if self._first_request_at is not None and self._last_output_at is not None:
            timings["working_s"] = self._last_output_at - self._first_request_at
        return {key: round(value, 2) for key, value in timings.items()}

    def shutdown(self) -> dict[str, float]:
        """Stop the loop and the engine; returns where the loop's time went."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=60)
        self._engine.engine_core.shutdown()
        return self.report()

    def _run(self) -> None:
        timings, clock = self.timings, time.perf_counter
        try:
            while not self._stopping:
                started = clock()
                self._admit()
                admitted = clock()
                timings["admitting_s"] += admitted - started
                if self._engine.has_unfinished_requests():
                    finished = [(out.request_id, out) for out in self._engine.step() if out.finished]
                    stepped = clock()
                    self._resolve(finished, failed=False)
                    if finished:
                        self._last_output_at = clock()
                    timings["steps"] += 1
                    timings["stepping_s"] += stepped - admitted
                    timings["handing_back_s"] += clock() - stepped
                else:
                    self._wake.wait()
                    self._wake.clear()
                    timings["idle_s"] += clock() - admitted
        except BaseException as exc:  # the engine itself failed: every waiting request learns it
            self.dead = exc
            self._admit()  # requests that arrived meanwhile fail too
            self._resolve([(rid, _dead_error(exc)) for rid in list(self._waiting)], failed=True)

    def _admit(self) -> None:
        refused = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, str):
                if self._waiting.pop(item, None) is not None:
                    self._engine.abort_request([item])
                continue
            if isinstance(item, _EngineCall):
                item.run(self._engine, self.dead)
                continue
            if isinstance(item, _Group):
                for request_id, prompt, params, lora_request in item.requests:
                    self._add(request_id, prompt, params, lora_request, item, refused)
                continue
            request_id, prompt, params, lora_request, loop, future = item
            self._add(request_id, prompt, params, lora_request, (loop, future), refused)
        self._resolve(refused, failed=True)

    def _add(self, request_id: str, prompt: Any, params: Any, lora_request: Any, waiter: Any, refused: list) -> None:
        self._waiting[request_id] = waiter
        if self.dead is not None:
            return
        if self._first_request_at is None:
            self._first_request_at = time.perf_counter()
        try:
            self._engine.add_request(request_id, prompt, params, lora_request=lora_request)
        except Exception as exc:  # this request's problem (too long, bad params): only it fails
            refused.append((request_id, exc))

    def _resolve(self, results: list[tuple[str, Any]], failed: bool) -> None:
        """Hand results to their waiting tasks: one wake-up per event loop, not per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for request_id, value in results:
            waiter = self._waiting.pop(request_id, None)
            if isinstance(waiter, _Group):
                if waiter.take(request_id, value):  # its last request: the group's list is its result
                    by_loop[waiter.loop].append((waiter.future, waiter.results, False))
            elif waiter is not None:
                by_loop[waiter[0]].append((waiter[1], value, failed))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # that event loop is closed: nobody is waiting
                pass


class _Group:
    """Requests handed over together, answered together (``EngineLoop.generate_all``)."""

    def __init__(self, requests: list, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.requests, self.loop, self.future = requests, loop, future
        self.index = {request[0]: i for i, request in enumerate(requests)}
        self.results: list[Any] = [None] * len(requests)
        self.left = len(requests)

    def take(self, request_id: str, value: Any) -> bool:
        """Record one request's output (or exception); True once every request has one."""
        self.results[self.index[request_id]] = value
        self.left -= 1
        return self.left == 0


class _EngineCall:
    """A call to make with the engine on its thread (loading an adapter), answered to one task."""

    def __init__(self, call: Any, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.call, self.loop, self.future = call, loop, future

    def run(self, engine: Any, dead: Optional[BaseException]) -> None:
        try:
            if dead is not None:
                raise _dead_error(dead)
            result, failed = self.call(engine), False
        except Exception as exc:  # the caller's to report (a refused adapter fails its rows only)
            result, failed = exc, True
        try:
            self.loop.call_soon_threadsafe(_settle, [(self.future, result, failed)])
        except RuntimeError:  # that event loop is closed: nobody is waiting
            pass


def _settle(items: list[tuple[asyncio.Future, Any, bool]]) -> None:
    for future, value, failed in items:
        if future.done():  # cancelled meanwhile
            continue
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)


def _dead_error(cause: BaseException) -> BaseException:
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:
        return RuntimeError(f"the vLLM engine stopped: {type(cause).__name__}: {cause}")
    error = EngineDeadError()
    error.args = (f"the vLLM engine stopped: {type(cause).__name__}: {cause}",)
    error.__cause__ = cause
    return error
