"""Loading the model's tokenizer once per stage worker."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_source: str):
    from transformers import AutoTokenizer

    from llm_assets.model_store import model_on_this_node

    model_source = model_on_this_node(model_source)  # an S3 model: its files on this node first
    try:
        return AutoTokenizer.from_pretrained(model_source, trust_remote_code=False)
    except Exception as exc:  # transformers' errors name neither the stage nor what to do
        hint = "" if os.path.exists(model_source) else " (the path does not exist and no model hub is used offline)"
        raise RuntimeError(f"cannot load the tokenizer of {model_source!r}{hint}: {exc}") from exc
