"""The engine client of a run: calls a Serve deployment through its handle. No model runs here.

Two kinds of deployment, by the config:

- ``engine`` (a ``ServeEngine`` llm_assets deployed, ``deployment.py``): each batch, as Tokenize
  wrote it, goes to the deployment's ``process`` and comes back with the engine's columns, as from
  an engine actor of the run's own pool.
- any other deployment (ray.data.llm's contract): each row is one call,
  ``getattr(handle, row["method"]).remote(dtype(**request))`` with ``request = {"request_id",
  "idx_in_batch", **row["request_kwargs"]}`` and ``dtype`` the row's ``dtype`` looked up in
  ``dtype_mapping`` (the dict itself without one); streamed, the first answer taken. The answer is
  kept whole as JSON in ``serve_response``; an OpenAI-shaped one also fills ``generated_text`` and
  the token counts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any, Optional

import pyarrow as pa

from llm_assets.engines.base import no_result, replica_info, with_results
from llm_assets.engines.http.replica import completion_columns
from llm_assets.rows import ERROR_COLUMN, ROW_ID, RowError, column_or_none, ok_rows

STAGE = "engine"
REQUEST_SNIPPET_CHARS = 200
LEASE_RENEW_S, LEASE_HOLD_S = 2.0, 60.0
RESPONSE_COLUMNS = {"serve_response": pa.string(), "request_id": pa.string(), "time_taken_llm": pa.float64()}
COMPLETION_COLUMNS = {
    "generated_text": pa.string(),
    "num_input_tokens": pa.int32(),
    "num_generated_tokens": pa.int32(),
    "finish_reason": pa.string(),
}


class ServeDeploymentReplica:
    def __init__(
        self,
        app_name: str,
        deployment_name: str,
        engine: bool,
        dtype_mapping: Optional[dict[str, type]] = None,
        request_timeout_s: Optional[float] = None,
        should_continue_on_error: bool = False,
        max_in_flight: int = 64,
        lease: Optional[str] = None,
    ):
        from ray import serve

        self.app_name, self.deployment_name, self.engine = app_name, deployment_name, engine
        self.handle = serve.get_deployment_handle(deployment_name, app_name)
        self.dtype_mapping = dtype_mapping or {}
        self.request_timeout_s, self.should_continue_on_error = request_timeout_s, should_continue_on_error
        self.lease, self.keeper, self._renewing = lease, None, None
        self.request_ids = itertools.count()
        self.served: dict[str, Any] = replica_info(0.0, max_in_flight)
        self.started, self.start_seconds = time.perf_counter(), 0.0

    async def ready(self) -> None:
        """Wait until the app runs (a deployment still loading its model, say), then learn from it
        what the pool's log and window need."""
        from ray.serve.exceptions import DeploymentUnavailableError

        from llm_assets.engines.serve.deployment import app_status

        while True:
            status = await asyncio.to_thread(app_status, self.app_name)
            if status is None or self.deployment_name not in status.deployments:
                raise DeploymentUnavailableError(
                    f"Serve app {self.app_name!r} with deployment {self.deployment_name!r} is not "
                    "running on this Ray cluster (deleted?)"
                )
            if status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                deployment = status.deployments[self.deployment_name]
                raise DeploymentUnavailableError(
                    f"Serve app {self.app_name!r} is {status.status}: {deployment.message or status.message}"
                )
            if status.status == "RUNNING":
                break
            await asyncio.sleep(0.5)
        if self.engine:
            self.served = await self.handle.describe.remote()
            if self.lease is not None:
                from llm_assets.engines.serve.watchdog import find_watchdog

                self.keeper = find_watchdog(self.app_name)
                self._renewing = asyncio.get_running_loop().create_task(self._hold())
        self.start_seconds = time.perf_counter() - self.started

    async def _hold(self) -> None:
        """Keep the run's lease on the app while this client is attached (see watchdog.py)."""
        while self.keeper is not None:
            await self.keeper.renew.remote(self.lease, LEASE_HOLD_S)
            await asyncio.sleep(LEASE_RENEW_S)

    def info(self) -> dict[str, Any]:
        # Where the engine runs (the Serve replica's pid and host) and how long this client waited for it.
        return {**self.served, "start_seconds": round(self.start_seconds, 2)}

    def fatal_errors(self) -> tuple[type[BaseException], ...]:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        return (RayActorError, BackPressureError, DeploymentUnavailableError)

    async def process(self, batch: pa.Table) -> pa.Table:
        if self.engine:
            return await self._process_batch(batch)
        row_ids = batch.column(ROW_ID).to_pylist()
        methods, dtypes = column_or_none(batch, "method"), column_or_none(batch, "dtype")
        kwargs = column_or_none(batch, "request_kwargs")
        upstream_ok = ok_rows(batch)
        results = await asyncio.gather(
            *(
                self._request(i, row_ids[i], methods[i], dtypes[i], kwargs[i]) if upstream_ok[i] else no_result()
                for i in range(batch.num_rows)
            )
        )
        columns = dict(RESPONSE_COLUMNS)
        if any("generated_text" in result for result in results):
            columns.update(COMPLETION_COLUMNS)
        return with_results(batch, results, columns, upstream_ok)

    async def _process_batch(self, batch: pa.Table) -> pa.Table:
        output = await self._answer(self.handle.process.remote(batch))
        if not self.should_continue_on_error:
            # The engine keeps every row's error (it serves pipelines of either setting); this
            # pipeline fails on its first, as with an engine of its own.
            errors = column_or_none(output, ERROR_COLUMN)
            upstream = column_or_none(batch, ERROR_COLUMN)
            failed = next((i for i, error in enumerate(errors) if error and not upstream[i]), None)
            if failed is not None:
                raise RowError(output.column(ROW_ID)[failed].as_py(), STAGE, errors[failed])
        return output

    async def _request(self, index: int, row_id: Any, method: str, dtype_name: Optional[str], kwargs_json: str) -> dict:
        from pydantic import BaseModel

        request_id = str(next(self.request_ids))
        started = time.perf_counter()
        try:
            request = {"request_id": request_id, "idx_in_batch": index, **json.loads(kwargs_json)}
            dtype = self.dtype_mapping[dtype_name] if dtype_name is not None else None
            call = getattr(self.handle.options(stream=True), method)
            answer = await self._answer(call.remote(dtype(**request) if dtype else request).__anext__())
        except self.fatal_errors():
            raise  # the deployment is gone or overloaded: not one row's problem
        except Exception as exc:
            message = f"{type(exc).__name__}: {_last_line(exc)} (request_kwargs: {kwargs_json[:REQUEST_SNIPPET_CHARS]})"
            if not self.should_continue_on_error:
                raise RowError(row_id, STAGE, message) from None
            return {"error": message, "request_id": request_id}
        if isinstance(answer, BaseModel):
            answer = answer.model_dump(mode="json")
        fields = completion_columns(answer) if isinstance(answer, dict) else {}
        return {
            **fields,
            "serve_response": json.dumps(answer, default=str),
            "request_id": request_id,
            "time_taken_llm": time.perf_counter() - started,
        }

    async def _answer(self, awaitable):
        if self.request_timeout_s is None:
            return await awaitable
        return await asyncio.wait_for(awaitable, self.request_timeout_s)

    def shutdown(self) -> dict[str, Any]:
        if self._renewing is not None:
            self._renewing.cancel()
            self.keeper.release.remote(self.lease)  # the app's idle time counts from now
        return {}


def _last_line(exc: BaseException) -> str:
    """A remote error's own message: the last line of Ray's traceback text."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else ""
