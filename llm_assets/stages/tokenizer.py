"""Loading the model's tokenizer once per stage worker."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_source: str):
    """``model_source``: a local folder, a hub id, or a path whose files live elsewhere and that
    brings them to this node itself (``on_this_node()``: an S3 model, ``model_store.py``)."""
    from transformers import AutoTokenizer

    if hasattr(model_source, "on_this_node"):
        model_source = model_source.on_this_node(print)
    try:
        return AutoTokenizer.from_pretrained(model_source, trust_remote_code=False)
    except Exception as exc:  # transformers' errors name neither the stage nor what to do
        hint = "" if os.path.exists(model_source) else " (the path does not exist and no model hub is used offline)"
        raise RuntimeError(f"cannot load the tokenizer of {model_source!r}{hint}: {exc}") from exc
