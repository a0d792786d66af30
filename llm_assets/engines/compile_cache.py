"""What an engine's cold start compiles, kept on each node for the next run.

One folder per node, ``LLM_ASSETS_COMPILE_CACHE`` (default ``~/.cache/llm_assets/compile``; a
folder on a shared filesystem shares it between nodes), holds the engine libraries' own caches:
vLLM's compiled graphs (``vllm/``), torch inductor's (``inductor/``: its default is under ``/tmp``,
which a reboot empties), Triton's kernels (``triton/``) and FlashInfer's JIT-compiled kernels
(``flashinfer/``). A variable the user set wins.

vLLM keys its compiled graphs by everything they depend on: the model's config, the engine's
settings, vLLM's and torch's versions and the source it traced. A changed setting compiles anew
beside the old entry; an unchanged one loads it. What a start did is told by the entries it made.
CUDA graph capture and the weights' loading are not cached: they are redone at every start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

CACHE_VARIABLES = {
    "VLLM_CACHE_ROOT": "vllm",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "TRITON_CACHE_DIR": "triton",
    # FlashInfer's JIT-compiled CUDA kernels (nvcc at a cold start on a GPU): under <base>/.cache/flashinfer.
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",
}
COMPILED_GRAPHS = "torch_compile_cache"  # vLLM's folder of compiled graphs, under VLLM_CACHE_ROOT


def compile_cache_dir() -> Path:
    return Path(os.environ.get("LLM_ASSETS_COMPILE_CACHE", "~/.cache/llm_assets/compile")).expanduser()


def use_compile_cache() -> None:
    """Point this process's engine libraries at the node's compile cache (before the engine is
    built; its core process inherits this environment)."""
    root = compile_cache_dir()
    for variable, folder in CACHE_VARIABLES.items():
        os.environ.setdefault(variable, str(root / folder))


class CompileCacheWatch:
    """What an engine start did with vLLM's compiled graphs: ``compiled`` (a new entry, kept for
    the next run), ``reused`` (no new entry: it loaded what a run before compiled), or ``eager``
    (compiles nothing)."""

    def __init__(self) -> None:
        self.folder = Path(os.environ.get("VLLM_CACHE_ROOT", "~/.cache/vllm")).expanduser() / COMPILED_GRAPHS
        self.before = self._entries()

    def _entries(self) -> set[str]:
        """vLLM's cache entries: a folder per hash of what the compiled graphs depend on, at most
        two levels down (``<hash>/rank_0_0``, ``torch_aot_compile/<hash>``). A start that loads
        an entry may still write into it (inductor's locks, a kernel it had not kept)."""
        if not self.folder.is_dir():
            return set()
        return {str(path) for pattern in ("*", "*/*") for path in self.folder.glob(pattern) if path.is_dir()}

    def outcome(self, eager: bool) -> dict[str, Optional[str]]:
        if eager:
            return {"compile_cache": "eager", "compile_cache_dir": None}
        new_entries = self._entries() - self.before
        return {"compile_cache": "compiled" if new_entries else "reused", "compile_cache_dir": str(self.folder)}
