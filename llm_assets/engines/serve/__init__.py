"""A Ray Serve deployment as the engine (ray.data.llm's ``ServeDeploymentProcessorConfig``).

Two uses, one config:

- ``engine=ServeEngine(...)``: an engine of ours that llm_assets deploys as a Serve app
  (``deployment.py``) and that any number of pipelines share: one model load for all of them, and
  on a Ray cluster that outlives runs, for the next runs too (until its idle timeout). The pipeline
  keeps the stages its engine config gives (chat template, Tokenize, Detokenize), sends batches of
  token ids and gets the engine's own columns.
- ``app_name``/``deployment_name`` of a deployment of your own, as with ray.data.llm: each row
  carries ``method``, ``request_kwargs`` and optionally ``dtype`` (a key of ``dtype_mapping``);
  the stages are Preprocess, engine, Postprocess.

The run's engine pool holds thin clients (``replica.py``), no model and no GPU: the GPUs are the
Serve app's.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Optional

from pydantic import Field, model_validator

from llm_assets.config import ProcessorConfig, StageConfig
from llm_assets.engines.base import Engine, RowCheck
from llm_assets.engines.serve.deployment import ServeEngine


class ServeDeploymentProcessorConfig(ProcessorConfig):
    """A pipeline whose engine is a Ray Serve deployment (ray.data.llm's fields, plus ``engine``,
    ``request_timeout_s``, ``should_continue_on_error``, ``runtime_env`` and
    ``max_concurrent_batches``)."""

    deployment_name: Optional[str] = Field(
        default=None, description="The deployment to call (the ServeEngine's, with engine=)."
    )
    app_name: Optional[str] = Field(
        default=None, description="Its Serve application (ray.data.llm's default: 'default')."
    )
    dtype_mapping: Optional[dict[str, Any]] = Field(
        default=None, description="Request class by the name rows give in 'dtype'."
    )
    engine: Optional[ServeEngine] = Field(
        default=None, description="An engine llm_assets deploys and shares (batch calls)."
    )
    request_timeout_s: Optional[float] = Field(
        default=None, gt=0, description="Per call (a row, or a batch with engine=); None: no limit."
    )
    should_continue_on_error: bool = False
    runtime_env: Optional[dict[str, Any]] = None
    max_concurrent_batches: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _names(self):
        if self.engine is not None:
            for name in ("app_name", "deployment_name"):
                given, deployed = getattr(self, name), getattr(self.engine, name)
                if given is not None and given != deployed:
                    raise ValueError(
                        f"{name} is {given!r} but the engine is deployed as {deployed!r}: leave {name} out"
                    )
            object.__setattr__(self, "app_name", self.engine.app_name)
            object.__setattr__(self, "deployment_name", self.engine.deployment_name)
        elif self.deployment_name is None:
            raise ValueError(
                "deployment_name: give the Serve deployment to call (with app_name), or engine=ServeEngine(...) "
                "for an engine llm_assets deploys"
            )
        elif self.app_name is None:
            object.__setattr__(self, "app_name", "default")
        return self

    @property
    def task_type(self) -> str:
        return self.engine.engine.task_type if self.engine is not None else "generate"

    @property
    def model_source(self) -> Optional[str]:
        return self.engine.engine.model_source if self.engine is not None else None

    def stage(self, name: str) -> StageConfig:
        """With a deployed engine, the CPU stages are as its engine config says (a vLLM pipeline's
        stages); without one there are none but Preprocess and Postprocess."""
        return self.engine.engine.stage(name) if self.engine is not None else super().stage(name)


class ServeDeploymentEngine(Engine):
    label = "Serve"
    config_class = ServeDeploymentProcessorConfig
    replica = "llm_assets.engines.serve.replica:ServeDeploymentReplica"
    distributions = ("ray",)
    code_modules = (
        "llm_assets.engines.base",
        "llm_assets.engines.serve.replica",
        "llm_assets.engines.serve.deployment",
    )
    config: ServeDeploymentProcessorConfig

    def served(self) -> Optional[Engine]:
        """The engine llm_assets deploys (``engine=ServeEngine(...)``), or None for a deployment of the user's."""
        from llm_assets.engines.base import engine_for

        return engine_for(self.config.engine.engine) if self.config.engine is not None else None

    def target(self) -> str:
        return f"Serve app {self.config.app_name!r} (deployment {self.config.deployment_name!r})"

    def preimport(self, on_gpu: bool) -> None:
        importlib.import_module("ray.serve")

    def provision(
        self, target: str, on_gpu: bool, engine_detokenizes: bool, log: Callable[[str], None]
    ) -> dict[str, Any]:
        from llm_assets.engines.serve.deployment import app_status, ensure_deployed, status_name

        config = self.config
        if config.engine is not None:
            return {"lease": ensure_deployed(config.engine, target, on_gpu, engine_detokenizes, log)}
        status = app_status(config.app_name)
        if status is None:
            from ray import serve

            running = sorted(serve.status().applications)
            raise RuntimeError(
                f"no Serve app {config.app_name!r} runs on this Ray cluster (apps: {', '.join(running) or 'none'}): "
                "deploy it first, or correct app_name"
            )
        if config.deployment_name not in status.deployments:
            raise RuntimeError(
                f"Serve app {config.app_name!r} has no deployment {config.deployment_name!r} "
                f"(its deployments: {', '.join(sorted(status.deployments))})"
            )
        log(
            f"Serve app {config.app_name!r}: calling deployment {config.deployment_name!r} "
            f"({status_name(status.status)})"
        )
        return {}

    def replica_kwargs(self, target: str, on_gpu: bool, engine_detokenizes: bool) -> dict[str, Any]:
        config = self.config
        return dict(
            app_name=config.app_name,
            deployment_name=config.deployment_name,
            engine=config.engine is not None,
            dtype_mapping=config.dtype_mapping,
            request_timeout_s=config.request_timeout_s,
            should_continue_on_error=config.should_continue_on_error,
            max_in_flight=config.batch_size,
        )

    def output_settings(self) -> dict[str, Any]:
        config = self.config
        settings: dict[str, Any] = {
            "app_name": config.app_name,
            "deployment_name": config.deployment_name,
            "should_continue_on_error": config.should_continue_on_error,
        }
        served = self.served()
        if served is None:  # a deployment of the user's: its code is not ours to hash
            settings["dtype_mapping"] = {
                name: f"{cls.__module__}.{cls.__qualname__}" for name, cls in (config.dtype_mapping or {}).items()
            }
            return settings
        from llm_assets import versions

        return {
            **settings,
            "engine": served.label,
            "library": served.library_version(),
            "engine_settings": served.output_settings(),
            "engine_code": [versions.module_code(name) for name in served.code_modules],
        }

    def max_prompt_tokens(self) -> Optional[int]:
        served = self.served()
        return served.max_prompt_tokens() if served is not None else None

    def check_row(self, row: dict[str, Any], task_check: RowCheck) -> dict[str, Any]:
        """A deployed engine of ours takes the task's rows; a deployment of the user's takes
        ray.data.llm's contract: ``method``, ``request_kwargs`` (stored as JSON text between
        stages: rows may carry different keys) and optionally ``dtype``."""
        served = self.served()
        if served is not None:
            return served.check_row(row, task_check)
        dtype_names = tuple(self.config.dtype_mapping or ())
        method, kwargs, dtype = row.get("method"), row.get("request_kwargs"), row.get("dtype")
        if not isinstance(method, str) or not method:
            raise ValueError(
                f"has no 'method' (columns: {sorted(row)}): expected the name of the deployment's method to call"
            )
        if not isinstance(kwargs, dict):
            got = "missing" if kwargs is None else f"a {type(kwargs).__name__}"
            raise ValueError(
                f"'request_kwargs' is {got} (columns: {sorted(row)}): expected the request's fields as a dict"
            )
        if dtype is not None and dtype not in dtype_names:
            raise ValueError(
                f"'dtype' is {dtype!r}, which the config's dtype_mapping does not name "
                f"({', '.join(dtype_names) or 'empty'})"
            )
        try:
            row["request_kwargs"] = json.dumps(kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"'request_kwargs' is not JSON-serializable: {exc}") from None
        return row

    def check_sampling_params(self, params: dict[str, Any]) -> None:
        served = self.served()
        if served is not None:
            served.check_sampling_params(params)

    def check_model(self, model: Any) -> None:
        served = self.served()
        if served is not None:
            served.check_model(model)


__all__ = ["ServeDeploymentEngine", "ServeDeploymentProcessorConfig", "ServeEngine"]
