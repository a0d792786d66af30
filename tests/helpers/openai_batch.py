"""OpenAI Batch API request lines and finished rows, as tests write them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs

from llm_assets.openai_batch import export_openai_batch, rows_from_openai_batch

CHAT = "/v1/chat/completions"


COMPLETIONS = "/v1/completions"


RESPONSES = "/v1/responses"


CREATED = 1_760_000_000


def request(custom_id="a", url=CHAT, **body):
    if not {"messages", "prompt", "input"} & body.keys():
        body = {{CHAT: "messages", COMPLETIONS: "prompt", RESPONSES: "input"}[url]: _default_input(url), **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _default_input(url):
    return "Say hi" if url != CHAT else [{"role": "user", "content": "Say hi"}]


def rows(*objects, name="batch.jsonl"):
    return list(rows_from_openai_batch(enumerate(objects, start=1), name))


def finished(row_id, text="Hi!", url=CHAT, model="served-model", error=None, finish_reason="stop", tokens=(5, 2)):
    """A row as the final stage writes it."""
    return {
        "row_id": row_id,
        "generated_text": None if error else text,
        "num_input_tokens": None if error else tokens[0],
        "num_generated_tokens": None if error else tokens[1],
        "finish_reason": None if error else finish_reason,
        "__inference_error__": error,
        "openai_url": url,
        "openai_model": model,
    }


def export(tmp_path, batches, **kwargs):
    output, errors = tmp_path / "out" / "output.jsonl", tmp_path / "out" / "errors.jsonl"
    counts = export_openai_batch(
        batches,
        pafs.LocalFileSystem(),
        str(output),
        str(errors),
        kwargs.pop("default_model", "default-model"),
        created=CREATED,
        **kwargs,
    )
    return counts, read_lines(output), read_lines(errors)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
