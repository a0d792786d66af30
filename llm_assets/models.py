"""Resolving ``model_source`` before any stage starts: clear errors, and GGUF files converted once.

vLLM's CPU build does not load GGUF, so a ``.gguf`` file is converted (dequantized, tokenizer
included) into a safetensors folder in the model cache the first time it is used; later runs
reuse the folder. The conversion is guarded by a file lock: concurrent runs convert once.
An ``s3://bucket/prefix`` model is downloaded into the same cache, once per node
(``model_store.py``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from llm_assets.model_cache import DONE_MARKER, ModelSourceError, model_cache_dir

__all__ = [
    "DONE_MARKER",
    "ModelSourceError",
    "check_local_model_source",
    "convert_gguf",
    "model_cache_dir",
    "resolve_model_source",
]


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf") or os.sep == "\\"


def resolve_model_source(source: str, log: Callable[[str], None] = print, s3: Any = None) -> str:
    """A local folder vLLM and transformers can load, or a hub repo id passed through. An S3
    model (read with ``s3``, a dagster-aws ``S3Resource``, or the AWS environment) is downloaded
    here and comes back as a path that other nodes can get their own copy of (``model_store``)."""
    if source.startswith("s3://"):
        from llm_assets.model_store import resolve_s3_model

        return resolve_s3_model(source, s3, log)
    local = check_local_model_source(source)
    if local is not None:
        return str(convert_gguf(Path(local), log)) if local.endswith(".gguf") else os.path.abspath(local)
    if not _in_hub_cache(source):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ModelSourceError(
                f"model_source {source!r} is no local path, and as a Hugging Face repo id it is not in the local "
                "cache while HF_HUB_OFFLINE is set: pass a local model folder, or download the model first"
            )
    return source  # a hub repo id: vLLM and transformers resolve it


def check_local_model_source(source: str, setting: str = "model_source") -> Optional[str]:
    """The local model folder or .gguf file ``source`` names (``~`` expanded), None for a hub repo id
    or an S3 URI (checked when a run starts); raises for a local path that is not a model. Cheap:
    called when definitions load, so a typo in a path fails ``dg check defs``."""
    if source.startswith("s3://"):
        return None
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise ModelSourceError(
                f"{setting} {source!r} is a folder without config.json: expected a Hugging Face model folder"
            )
        return expanded
    if os.path.isfile(expanded):
        if expanded.endswith(".gguf"):
            return expanded
        raise ModelSourceError(f"{setting} {source!r} is a file: expected a model folder or a .gguf file")
    if _looks_like_path(source) or os.path.isdir(source.split("/", 1)[0]):
        # A path (``models/x`` beside a ``models`` folder is a path with a typo, not a repo id).
        raise ModelSourceError(
            f"{setting} {source!r} does not exist (relative paths start from {os.getcwd()}): expected a "
            "local model folder (config.json + tokenizer), a .gguf file, or a Hugging Face repo id"
        )
    return None


def check_s3_load_format(model_source: str, engine_kwargs: dict[str, Any]) -> None:
    """Streaming weights from S3 (vLLM's runai streamer) is not built here: refuse it at
    definition, naming what to do, rather than download silently."""
    if not str(model_source).startswith("s3://") or engine_kwargs.get("load_format") != "runai_streamer":
        return
    import importlib.util

    installed = importlib.util.find_spec("runai_model_streamer") is not None
    raise ValueError(
        f"engine_kwargs.load_format='runai_streamer' with model_source {model_source!r}: "
        "streaming weights from S3 is not "
        f"supported by llm_assets yet (runai-model-streamer is {'installed' if installed else 'not installed'}); "
        "remove load_format: the model is then downloaded once per node into the model cache"
    )


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id at all
        return False


def convert_gguf(gguf: Path, log: Callable[[str], None] = print) -> Path:
    from filelock import FileLock

    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = model_cache_dir() / f"{gguf.stem}-{digest}"
    if (target / DONE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / DONE_MARKER).exists():
            return target
        _convert(gguf, target, log)
    return target


def _convert(gguf: Path, target: Path, log: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"Converting {gguf.name} to a safetensors folder in {target} (once; later runs reuse it) [1/3 tokenizer]")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(tmp))
    log(f"Converting {gguf.name} [2/3 dequantizing weights, {time.monotonic() - started:.0f} s so far]")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are already dequantized to torch tensors; only the GGUF marker remains, and it
    # would make transformers refuse to save (and vLLM look for a GGUF file).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log(f"Converting {gguf.name} [3/3 writing safetensors, {time.monotonic() - started:.0f} s so far]")
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / DONE_MARKER).write_text(str(gguf))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    log(f"Converted {gguf.name} in {time.monotonic() - started:.0f} s")
