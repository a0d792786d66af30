"""The benchmark workload, built offline: a Llama-architecture config run with dummy weights, a
tokenizer, and chat prompts of about 400 input tokens split into partition files.

    python bench/workload.py --out /tmp/bench --size 1b --partitions 10 --rows 1000                 # the base workload
    python bench/workload.py --out /tmp/scale --size 1b --partitions 100 --rows 500 --max-tokens 32 # the scale workload
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llm_assets.testing import build_llama_model

MODELS = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=2),  # CPU smoke run
    # hidden, intermediate, layers, heads, kv heads
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8),
}
VOCAB = 32000
MAX_TOKENS = 128
INPUT_TOKENS = 400


def sampling_params(max_tokens: int = MAX_TOKENS) -> dict:
    return {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}


def build(out: Path, size: str, partitions: int, rows: int, max_tokens: int = MAX_TOKENS, seed: int = 0) -> dict:
    from transformers import AutoTokenizer

    model = out / f"llama-{size}"
    if not (model / "config.json").exists():
        build_llama_model(
            model,
            **MODELS[size],
            vocab_size=VOCAB,
            tokenizer_vocab=8192,
            dtype="bfloat16",
            max_position_embeddings=4096,
            with_weights=False,
        )
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    words = [w for w in (tokenizer.convert_ids_to_tokens(i) for i in range(300, 8000)) if w.isalpha()]
    rng = random.Random(seed)
    landing = out / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    # Calibrate words per prompt once so that prompts land near INPUT_TOKENS tokens.
    probe = " ".join(rng.choice(words) for _ in range(400))
    tokens_per_word = len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / 400
    n_words = int(INPUT_TOKENS / tokens_per_word)
    # Rescale once on real templated prompts (the chat template adds tokens, words vary).
    sample = [" ".join(rng.choice(words) for _ in range(n_words)) for _ in range(32)]
    lengths = [
        len(
            tokenizer.apply_chat_template(
                messages({"text": t}), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for t in sample
    ]
    n_words = int(n_words * INPUT_TOKENS / (sum(lengths) / len(lengths)))
    for p in range(partitions):
        with open(landing / f"part-{p:03d}.jsonl", "w") as f:
            for r in range(rows):
                text = " ".join(rng.choice(words) for _ in range(n_words))
                f.write(json.dumps({"id": f"{p}-{r}", "text": text}) + "\n")
    spec = {
        "model": str(model),
        "landing": str(landing),
        "partitions": partitions,
        "rows": rows,
        "max_tokens": max_tokens,
        "size": size,
    }
    (out / "workload.json").write_text(json.dumps(spec, indent=1))
    return spec


def messages(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["text"]}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=sorted(MODELS), default="1b")
    parser.add_argument("--partitions", type=int, default=10)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    args = parser.parse_args()
    print(json.dumps(build(args.out, args.size, args.partitions, args.rows, args.max_tokens)))
