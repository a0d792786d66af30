"""Engine settings a batch job gets on a GPU unless the user chose them: where vLLM's defaults,
made for a server, leave a batch job's GPU waiting.

Kept apart from compat.py, which holds what a vLLM build needs to run at all: the benchmark's raw
vLLM and ray.data.llm runs take those, and vLLM's own defaults for everything here.
"""

from __future__ import annotations

from typing import Any

# vLLM's offline default of sequences run at once on an H100/H200-class GPU (arg_utils).
GPU_MAX_NUM_SEQS = 1024
# vLLM's default largest batch with a CUDA graph, in tokens, before Blackwell.
VLLM_MAX_GRAPH_TOKENS = 512
# compilation_config keys that settle which batches get CUDA graphs, or that there are none.
GRAPH_SETTINGS = ("max_cudagraph_capture_size", "cudagraph_capture_sizes", "cudagraph_mode", "mode", "level")


def with_decode_batch_graphs(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """CUDA graphs up to the engine's whole decode batch, unless the user settled the graphs.

    vLLM captures graphs for batches of up to min(2 x max_num_seqs, 512) tokens (1024 on
    Blackwell): a server rarely decodes more sequences at once. A batch job decodes max_num_seqs
    (1024 on an H100) at once, so every full decode step ran without a graph, its kernels launched
    one by one by an engine core that is CPU-bound at a small model's size. Measured on an H100,
    the 1B config, 40 x 1 000 rows x 128 tokens, one machine (docs/benchmarks.md): 35.0 ms a step
    against 43.1, generation 1.22x faster, 83 sizes captured instead of 51 (about 2 s).
    Left alone: eager engines, speculative decoding (a decode step is several tokens a sequence)
    and pooling (no decode)."""
    compilation = engine_kwargs.get("compilation_config")
    if compilation is not None and not isinstance(compilation, dict):
        return engine_kwargs  # a CompilationConfig object, or a level: the user's own
    if (
        engine_kwargs.get("enforce_eager")
        or engine_kwargs.get("speculative_config")
        or engine_kwargs.get("runner") == "pooling"
        or any(key in (compilation or {}) for key in GRAPH_SETTINGS)
    ):
        return engine_kwargs
    size = int(engine_kwargs.get("max_num_seqs") or GPU_MAX_NUM_SEQS)
    if engine_kwargs.get("max_num_batched_tokens"):  # no batch is larger
        size = min(size, int(engine_kwargs["max_num_batched_tokens"]))
    if size <= VLLM_MAX_GRAPH_TOKENS:  # vLLM's own default covers the decode batch
        return engine_kwargs
    return {**engine_kwargs, "compilation_config": {**(compilation or {}), "max_cudagraph_capture_size": size}}
