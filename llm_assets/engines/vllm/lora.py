"""Multi-LoRA, as ray.data.llm does it: a row whose ``model`` names something other than the
config's ``model_source`` asks for that LoRA adapter on top of the base model.

Where an adapter comes from (the row's ``model`` is its name):

- with ``dynamic_lora_loading_path`` a local folder: the subfolder of that name;
- with ``dynamic_lora_loading_path`` an ``s3://bucket/prefix``: the objects under ``prefix/name``,
  downloaded into the model cache (``model_store.fetch``: once per node, a file lock, resume)
  with the S3 settings the base model travels with when it is on S3 itself (``EnginePoolResource
  .model_s3``), otherwise each node's AWS configuration;
- without it: the name is a local adapter folder or, as vLLM resolves it, a Hugging Face repo id.

Each engine resolves a name once and keeps its ``LoRARequest`` (one int id per name), and loads the
adapter into the engine before the first row using it is sent: an adapter that does not resolve or
that vLLM refuses (a rank above ``max_lora_rank``, modules the model lacks) fails its rows, never the
engine. ``max_lora_rank`` and ``max_loras`` (adapters in one engine step) stay ``engine_kwargs``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

ADAPTER_CONFIG = "adapter_config.json"
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "http://", "https://")


def wants_adapter(model: Any, base_models: tuple[str, ...]) -> bool:
    """Whether a row's ``model`` asks for a LoRA adapter (empty or the base model's name: no)."""
    return bool(model) and model not in base_models


def check_lora_settings(dynamic_lora_loading_path: Optional[str], engine_kwargs: dict[str, Any]) -> None:
    """The config's LoRA settings, checked when the pipeline is defined (ValueError)."""
    if dynamic_lora_loading_path is None:
        return
    if dynamic_lora_loading_path.startswith(REMOTE_SCHEMES) and not dynamic_lora_loading_path.startswith("s3://"):
        raise ValueError(
            f"dynamic_lora_loading_path {dynamic_lora_loading_path!r}: expected a local folder or an "
            "s3://bucket/prefix (other stores are not supported)"
        )
    if dynamic_lora_loading_path.startswith("s3://"):
        from llm_assets.model_store import split_s3_uri

        split_s3_uri(dynamic_lora_loading_path)  # a bucket is named
    if not engine_kwargs.get("enable_lora"):
        raise ValueError(
            "dynamic_lora_loading_path is set and engine_kwargs.enable_lora is not: vLLM serves LoRA "
            "adapters only with engine_kwargs={'enable_lora': True, 'max_lora_rank': ..., 'max_loras': ...}"
        )


def check_row_model(
    model: Any, *, base_model: str, lora_enabled: bool, dynamic_lora_loading_path: Optional[str]
) -> None:
    """Preprocess's check of a row's ``model`` (``vLLMEngine.check_model``): raises ValueError
    before any engine starts for a LoRA row this pipeline cannot serve."""
    if model is None or model == "" or model == base_model:
        return
    if not isinstance(model, str):
        raise ValueError(
            f"'model' is {type(model).__name__} {model!r:.60}: expected a LoRA adapter's name (a string), "
            "or the base model's model_source"
        )
    if not lora_enabled:
        raise ValueError(
            f"asks for LoRA adapter {model!r} (its 'model' is not model_source {base_model!r}), and "
            "engine_kwargs.enable_lora is not set: set engine_kwargs={'enable_lora': True, 'max_lora_rank': ...} "
            "(and dynamic_lora_loading_path for adapters by name), or drop the row's 'model'"
        )
    if model.startswith(REMOTE_SCHEMES):
        raise ValueError(
            f"'model' {model!r}: an adapter's name cannot be a remote path; name it, and set "
            "dynamic_lora_loading_path to the folder or s3:// prefix that holds it"
        )
    if dynamic_lora_loading_path and not dynamic_lora_loading_path.startswith("s3://"):
        folder = Path(dynamic_lora_loading_path).expanduser() / model
        if not (folder / ADAPTER_CONFIG).is_file():  # a local folder: found now, before the engine starts
            raise ValueError(
                f"asks for LoRA adapter {model!r}, and {folder} has no {ADAPTER_CONFIG} "
                f"(dynamic_lora_loading_path {dynamic_lora_loading_path!r})"
            )


class LoraAdapters:
    """The adapters one engine has resolved and loaded, by name (see the module's docstring)."""

    def __init__(
        self,
        base_models: tuple[str, ...],
        dynamic_lora_loading_path: Optional[str],
        s3_access: Any,
        load: Callable[[Any], Awaitable[Any]],
        log: Callable[[str], None] = print,
    ):
        self.base_models = base_models
        self.path = dynamic_lora_loading_path
        self.s3_access = s3_access
        self.load = load  # loads a LoRARequest into the engine (on the engine's thread)
        self.log = log
        # name -> the task resolving it; a failure is kept too: every row of that name gets it.
        self._requests: dict[str, asyncio.Task] = {}

    async def request_for(self, model: Any) -> Optional[Any]:
        """The row's ``LoRARequest``, or None for the base model; raises ValueError for an adapter
        that does not resolve or that the engine refuses."""
        if not wants_adapter(model, self.base_models):
            return None
        task = self._requests.get(model)
        if task is None:
            task = self._requests[model] = asyncio.ensure_future(self._resolve(model, len(self._requests) + 1))
        return await asyncio.shield(task)

    async def _resolve(self, name: str, int_id: int) -> Any:
        from vllm.lora.request import LoRARequest

        folder = await asyncio.to_thread(self._local_folder, name)
        request = LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=folder)
        try:
            await self.load(request)
        except Exception as exc:  # vLLM's own words on why (rank, modules...); the engine lives on
            raise ValueError(
                f"LoRA adapter {name!r} ({folder}): vLLM did not load it: {type(exc).__name__}: {exc}"
            ) from exc
        self.log(f"LoRA adapter {name!r}: loaded from {folder} (id {int_id})")
        return request

    def _local_folder(self, name: str) -> str:
        """The adapter's folder on this node, downloaded first when it lives on S3."""
        if self.path and self.path.startswith("s3://"):
            return self._from_s3(name)
        if self.path:
            folder = Path(self.path).expanduser() / name
            where = f"under dynamic_lora_loading_path {self.path!r}"
        else:
            from vllm.lora.utils import get_adapter_absolute_path

            folder = Path(get_adapter_absolute_path(name))  # vLLM's way: a local folder, or a hub repo's snapshot
            where = (
                "as a local folder or a Hugging Face repo (set dynamic_lora_loading_path to name adapters in a folder)"
            )
        if not (folder / ADAPTER_CONFIG).is_file():
            raise ValueError(f"LoRA adapter {name!r} was not found {where}: {folder} has no {ADAPTER_CONFIG}")
        return str(folder)

    def _from_s3(self, name: str) -> str:
        from llm_assets.model_store import fetch, list_folder

        uri = f"{self.path.rstrip('/')}/{name}"
        adapter = list_folder(uri, self.s3_access, setting="dynamic_lora_loading_path")
        if not any(o.name == ADAPTER_CONFIG for o in adapter.objects):
            found = f"{len(adapter.objects)} objects, none named {ADAPTER_CONFIG}" if adapter.objects else "no objects"
            raise ValueError(
                f"LoRA adapter {name!r} was not found under dynamic_lora_loading_path {self.path!r}: "
                f"{found} under {uri}"
            )
        return os.fspath(fetch(adapter, self.log))
