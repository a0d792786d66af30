"""The HTTP engine replica: each row's ``payload`` POSTed to an OpenAI-compatible endpoint.

Every row of a batch is its own request, sent concurrently (paced by the run's shared
``RequestPacer`` when ``qps`` is set). A request that gets 429, 408 or a 5xx answer, times out or
loses its connection is sent again, up to ``max_retries`` times, after ``Retry-After`` when the
server says, otherwise after an exponential backoff with jitter. The answer is kept whole in
``http_response`` (JSON); chat and text completions also fill the columns the vLLM engine writes
(``generated_text``, token counts, ``finish_reason``), so Postprocess, the asset checks and the
OpenAI Batch export read them the same way.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from typing import Any, Callable, Optional

import pyarrow as pa

from llm_assets.engines.base import no_result, replica_info, with_results
from llm_assets.engines.http.connections import paced_session
from llm_assets.rows import ROW_ID, RowError, column_or_none, ok_rows

STAGE = "engine"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
ANSWER_SNIPPET_CHARS = 300


class RequestFailed(Exception):
    """A request that got no usable answer; ``retryable`` says whether sending it again may help."""

    def __init__(self, message: str, retryable: bool, retry_after_s: Optional[float] = None):
        super().__init__(message)
        self.retryable, self.retry_after_s = retryable, retry_after_s


class HttpRequestReplica:
    def __init__(
        self,
        url: str,
        headers: Optional[dict[str, Any]] = None,
        max_retries: int = 0,
        base_retry_wait_time_in_s: float = 1.0,
        request_timeout_s: float = 300.0,
        session_factory: Optional[Callable[[], Any]] = None,
        pacer: Any = None,
        should_continue_on_error: bool = False,
        max_in_flight: int = 256,
    ):
        import aiohttp

        self.url = url
        self.headers = {"Content-Type": "application/json", **{k: str(v) for k, v in (headers or {}).items()}}
        self.max_retries, self.base_wait_s = max_retries, base_retry_wait_time_in_s
        # Per attempt, from the request sent to its answer: not the wait for one of the session's
        # connections (up to 100 at once), which with hundreds of rows in flight would time out
        # requests never sent. Passed with each request, so a session_factory's session gets it too.
        self.timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=30, sock_read=request_timeout_s)
        self.session_factory = session_factory or paced_session
        self.pacer = pacer
        self.should_continue_on_error = should_continue_on_error
        self.max_in_flight = max_in_flight
        self._session: Any = None

    def fatal_errors(self) -> tuple[type[BaseException], ...]:
        return ()  # an endpoint's failure is a row's; only the actor's death is the replica's

    def info(self) -> dict[str, Any]:
        return replica_info(0.0, self.max_in_flight)

    async def process(self, batch: pa.Table) -> pa.Table:
        if self._session is None:
            self._session = self.session_factory()  # made here: it belongs to the actor's event loop
        row_ids = batch.column(ROW_ID).to_pylist()
        payloads = column_or_none(batch, "payload")
        upstream_ok = ok_rows(batch)
        send_at = await self._send_times(sum(upstream_ok))
        slots = iter(send_at)
        results = await asyncio.gather(
            *(
                self._request(row_ids[i], payloads[i], next(slots)) if upstream_ok[i] else no_result()
                for i in range(batch.num_rows)
            )
        )
        return with_results(batch, results, OUTPUT_COLUMNS, upstream_ok)

    async def _send_times(self, count: int) -> list[float]:
        """When each of ``count`` requests may first be sent (wall clock): now, or ``qps`` apart
        across every replica of the run."""
        if self.pacer is None or count == 0:
            return [0.0] * count
        return await self.pacer.reserve.remote(count)

    async def _request(self, row_id: Any, payload_json: Optional[str], send_at: float) -> dict[str, Any]:
        started = time.perf_counter()
        retries = 0
        await _sleep_until(send_at)
        while True:
            try:
                answer = await self._post(payload_json)
                break
            except RequestFailed as exc:
                if not exc.retryable or retries >= self.max_retries:
                    message = f"{exc}" + (f" (after {retries + 1} attempts)" if retries else "")
                    if not self.should_continue_on_error:
                        raise RowError(row_id, STAGE, message) from None
                    return {"error": message, "http_retries": retries}
                retry_after_s = exc.retry_after_s
            retries += 1
            await asyncio.sleep(self._wait_s(retries, retry_after_s))
            if self.pacer is not None:  # a retry is a request like any other: it takes its own slot
                (slot,) = await self.pacer.reserve.remote(1)
                await _sleep_until(slot)
        return {
            **completion_columns(answer),
            "http_response": json.dumps(answer),
            "http_retries": retries,
            "time_taken_llm": time.perf_counter() - started,
        }

    async def _post(self, payload_json: Optional[str]) -> dict[str, Any]:
        import aiohttp

        try:
            async with self._session.post(
                self.url, data=payload_json or "{}", headers=self.headers, timeout=self.timeout
            ) as response:
                text = _decoded(await response.read(), response.charset, self.url)
                if response.status in RETRY_STATUSES:
                    raise RequestFailed(
                        f"HTTP {response.status} from {self.url}: {text[:ANSWER_SNIPPET_CHARS]}",
                        True,
                        _retry_after_s(response.headers.get("Retry-After")),
                    )
                if response.status >= 400:
                    raise RequestFailed(f"HTTP {response.status} from {self.url}: {text[:ANSWER_SNIPPET_CHARS]}", False)
        except (asyncio.TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise RequestFailed(f"{type(exc).__name__} from {self.url}: {exc}", True) from None
        try:
            answer = json.loads(text)
        except ValueError:
            raise RequestFailed(
                f"the answer from {self.url} is not JSON: {text[:ANSWER_SNIPPET_CHARS]!r}", False
            ) from None
        if not isinstance(answer, dict):
            raise RequestFailed(
                f"the answer from {self.url} is a JSON {type(answer).__name__}, expected an object", False
            )
        if answer.get("error") and "choices" not in answer:
            # OpenAI's error object, which some gateways send with status 200.
            raise _error_object(answer["error"], self.url)
        return answer

    def _wait_s(self, retry: int, retry_after_s: Optional[float]) -> float:
        if retry_after_s is not None:
            return retry_after_s
        # Full jitter: replicas that failed together do not retry together.
        return random.uniform(0.5, 1.0) * self.base_wait_s * 2 ** (retry - 1)

    def shutdown(self) -> dict[str, Any]:
        if self._session is not None and not self._session.closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called off the actor's loop: the actor's end closes the sockets
                return {}
            loop.create_task(self._session.close())
        return {}


OUTPUT_COLUMNS: dict[str, pa.DataType] = {
    "http_response": pa.string(),
    "http_retries": pa.int32(),
    "generated_text": pa.string(),
    "num_input_tokens": pa.int32(),
    "num_generated_tokens": pa.int32(),
    "finish_reason": pa.string(),
    "time_taken_llm": pa.float64(),
}


def completion_columns(answer: dict[str, Any]) -> dict[str, Any]:
    """The vLLM engine's columns, from a chat or text completion answer (empty for others). Servers
    differ in what they put there (content as a list of parts, counts as floats): each value is
    taken in the column's type, or left null, never allowed to fail the batch's other rows."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return {}
    first = choices[0]
    message = first.get("message")
    text = message.get("content") if isinstance(message, dict) else first.get("text")
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    finish_reason = first.get("finish_reason")
    return {
        "generated_text": _text(text),
        "finish_reason": None if finish_reason is None else str(finish_reason),
        "num_input_tokens": _token_count(usage.get("prompt_tokens")),
        "num_generated_tokens": _token_count(usage.get("completion_tokens")),
    }


def _text(content: Any) -> Optional[str]:
    """A message's content as text: a string, or the text parts of a list of content parts
    (``[{"type": "text", "text": ...}]``, as OpenAI's API allows); other values as JSON."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(part["text"] for part in content if isinstance(part.get("text"), str))
    return json.dumps(content)


def _token_count(value: Any) -> Optional[int]:
    """A usage count as the int32 column takes it; null where the server sent something else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if value != int(value):
        return None
    return int(value) if 0 <= value < 2**31 else None


def _error_object(error: Any, url: str) -> RequestFailed:
    """A failed request from an answer's ``{"error": ...}`` object; retried where its code is a
    status that is (429, 5xx)."""
    message = error.get("message", error) if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    retryable = str(code) in {str(status) for status in RETRY_STATUSES}
    return RequestFailed(f"the answer from {url} is an error: {str(message)[:ANSWER_SNIPPET_CHARS]}", retryable)


def _decoded(body: bytes, charset: Optional[str], url: str) -> str:
    """The answer's text in its declared charset (JSON's UTF-8 by default). Bytes that are not
    that text fail the row, naming them, rather than being replaced: a replacement character would
    pass into the generated text unnoticed."""
    encoding = charset or "utf-8"
    try:
        return body.decode(encoding)
    except LookupError:
        raise RequestFailed(f"the answer from {url} names an unknown charset {encoding!r}", False) from None
    except UnicodeDecodeError as exc:
        snippet = body[max(0, exc.start - 40) : exc.end + 40]
        raise RequestFailed(
            f"the answer from {url} is not valid {encoding} text (byte {exc.start}: {snippet!r})", False
        ) from None


def _retry_after_s(value: Optional[str]) -> Optional[float]:
    """``Retry-After`` in seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # "inf" or "nan" say nothing usable: the backoff applies
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


async def _sleep_until(wall_time: float) -> None:
    delay = wall_time - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
