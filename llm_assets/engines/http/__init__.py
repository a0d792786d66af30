"""An OpenAI-compatible HTTP endpoint as the engine (ray.data.llm's ``HttpRequestProcessorConfig``).

Preprocess makes each row's ``payload`` (the request's JSON body); the replica (``replica.py``)
POSTs it to ``url``. No chat template, tokenizer or model runs here: the server does all that, so
the plan is Preprocess -> engine -> Postprocess. ``qps`` is one rate for the whole run, kept by a
``RequestPacer`` actor (``pacer.py``) that every replica asks for send times; runs that send to the
same URL from the same machine share that rate.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from pydantic import Field, field_validator

from llm_assets.config import ProcessorConfig
from llm_assets.engines.base import Engine, RowCheck


class HttpRequestProcessorConfig(ProcessorConfig):
    """The configuration of a pipeline whose engine is an HTTP endpoint (ray.data.llm's fields,
    plus ``request_timeout_s``, ``should_continue_on_error``, ``runtime_env`` and
    ``max_concurrent_batches``)."""

    batch_size: int = Field(default=64, ge=1)
    url: str = Field(description="Where each row's payload is POSTed, e.g. http://host:8000/v1/chat/completions.")
    headers: Optional[dict[str, Any]] = Field(
        default=None,
        description="Sent with every request (never logged or hashed); a "
        "value may be dg.EnvVar('NAME'), read from the run's environment when it starts.",
    )
    qps: Optional[float] = Field(
        default=None,
        gt=0,
        description="Requests per second to this URL, for every replica of every run "
        "launched from this machine together; None: no limit.",
    )
    max_retries: int = Field(
        default=0,
        ge=0,
        description="Times a request is sent again after 429, 408, 5xx, a timeout or a dropped connection.",
    )
    base_retry_wait_time_in_s: float = Field(
        default=1.0, ge=0, description="First backoff; doubles per retry (with jitter). Retry-After wins."
    )
    session_factory: Optional[Any] = Field(
        default=None, exclude=True, description="() -> aiohttp.ClientSession, made in the replica."
    )
    request_timeout_s: float = Field(default=300.0, gt=0, description="Per attempt, the answer included.")
    should_continue_on_error: bool = False
    task_type: str = "generate"
    runtime_env: Optional[dict[str, Any]] = None
    max_concurrent_batches: int = Field(default=8, ge=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url {value!r}: expected an http:// or https:// URL")
        return value

    @field_validator("task_type")
    @classmethod
    def _generate_only(cls, value: str) -> str:
        if value != "generate":
            raise ValueError(f"task_type {value!r}: the HTTP engine runs 'generate' only")
        return value


class HttpRequestEngine(Engine):
    label = "HTTP"
    config_class = HttpRequestProcessorConfig
    replica = "llm_assets.engines.http.replica:HttpRequestReplica"
    distributions = ("aiohttp",)
    code_modules = ("llm_assets.engines.base", "llm_assets.engines.http.replica")
    count_columns = {"http_retries": "retries"}  # requests sent again
    config: HttpRequestProcessorConfig

    def model_source(self) -> Optional[str]:
        return None  # the endpoint runs the model

    def target(self) -> str:
        return self.config.url

    def replica_kwargs(self, target: str, on_gpu: bool, engine_detokenizes: bool) -> dict[str, Any]:
        config = self.config
        pacer = None
        if config.qps:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from llm_assets.engines.http.pacer import RequestPacer

            # Owned by the run's driver: it ends with the pool's last reference, so with the run. On
            # the driver's node: the endpoint's schedule file is that machine's (pacer.py).
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            pacer = (
                ray.remote(RequestPacer).options(num_cpus=0, scheduling_strategy=here).remote(config.url, config.qps)
            )
        return dict(
            url=config.url,
            headers=_headers(config),
            max_retries=config.max_retries,
            base_retry_wait_time_in_s=config.base_retry_wait_time_in_s,
            request_timeout_s=config.request_timeout_s,
            session_factory=config.session_factory,
            pacer=pacer,
            should_continue_on_error=config.should_continue_on_error,
            max_in_flight=config.batch_size,
        )

    def output_settings(self) -> dict[str, Any]:
        # The URL and error handling change the output; headers may hold keys and are left out, and
        # the pace and retries change only when rows are answered.
        return {"url": self.config.url, "should_continue_on_error": self.config.should_continue_on_error}

    def check_row(self, row: dict[str, Any], task_check: RowCheck) -> dict[str, Any]:
        """The request body replaces the task's request (no chat template or tokenizer runs here):
        stored as JSON text (rows' bodies differ; one Parquet schema cannot hold them)."""
        payload = row.get("payload")
        if not isinstance(payload, dict):
            got = "missing" if payload is None else f"{type(payload).__name__}"
            raise ValueError(
                f"'payload' is {got} (columns: {sorted(row)}): expected the request's JSON body as a dict, "
                "e.g. {'model': ..., 'messages': [...]} (return it from preprocess)"
            )
        try:
            row["payload"] = json.dumps(payload)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"'payload' is not JSON-serializable: {exc}") from None
        return row


def _headers(config: HttpRequestProcessorConfig) -> dict[str, str]:
    """The headers as sent. A value with ``get_value()`` (``dg.EnvVar``) is read from the run's
    environment here, so an API key sits in no definition, config, code version or log."""
    headers = {}
    for name, value in (config.headers or {}).items():
        read = getattr(value, "get_value", None)
        if read is not None:
            resolved = read()
            if resolved is None:
                variable = getattr(value, "env_var_name", "(unnamed)")
                raise ValueError(
                    f"headers[{name!r}]: the environment variable {variable!r} is not set in the run's process"
                )
            value = resolved
        headers[name] = str(value)
    return headers
