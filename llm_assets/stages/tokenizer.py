"""Loading the model's tokenizer once per stage worker."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Optional


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_source: str):
    """``model_source``: a local folder, a hub id, or a path whose files live elsewhere and that
    brings them to this node itself (``on_this_node()``: an S3 model, ``model_store.py``)."""
    if hasattr(model_source, "on_this_node"):
        model_source = model_source.on_this_node(print)
    try:
        named = _named_class(model_source)
        if named is not None:
            return named.from_pretrained(model_source)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_source, trust_remote_code=False)
    except Exception as exc:  # transformers' errors name neither the stage nor what to do
        hint = "" if os.path.exists(model_source) else " (the path does not exist and no model hub is used offline)"
        raise RuntimeError(f"cannot load the tokenizer of {model_source!r}{hint}: {exc}") from exc


def _named_class(model_source: str) -> Optional[Any]:
    """The tokenizer class a local model's ``tokenizer_config.json`` names, as transformers exports
    it; None where AutoTokenizer has to decide (no such file or name, remote code). AutoTokenizer
    picks that same class, but importing it imports the model configurations and with them torch:
    about 340 MB of unique memory in every tokenizer-stage worker, which needs none of it."""
    config_file = Path(model_source) / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    name = config.get("tokenizer_class")
    if not isinstance(name, str) or "auto_map" in config:
        return None
    import transformers

    return getattr(transformers, name, None)
