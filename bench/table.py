"""Print the benchmark results as a Markdown table, with ratios to raw vLLM (SGLang systems: to raw SGLang)
measured in the same sitting."""

import json
import sys

ORDER = [
    "raw_vllm",
    "ray_data_llm",
    "llm_assets",
    "llm_assets_in_process",
    "llm_assets_2gpu",
    "raw_sglang",
    "llm_assets_sglang",
]


def parallel(result: dict) -> str:
    """' TP=2', ' PP=2' or ' TP=2 PP=2' after the model, where an engine spans several GPUs."""
    sizes = (("TP", result.get("tensor_parallel_size", 1)), ("PP", result.get("pipeline_parallel_size", 1)))
    return "".join(f" {name}={size}" for name, size in sizes if size > 1)


def main(paths: list[str]) -> None:
    loaded = (json.load(open(p)) for p in paths)
    results = {r["system"]: r for r in loaded if "system" in r}  # skips workload.json
    peer = results.get("ray_data_llm")
    print(
        "| system | model | rows | engine start (s) | generate (s) | output tok/s (generate) | vs raw | whole job (s) "
        "| vs raw whole job | whole-job tok/s | vs ray.data.llm | GPU busy | GPU util % | host peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ORDER:
        r = results.get(name)
        if r is None:
            continue
        raw = results.get("raw_sglang" if "sglang" in name else "raw_vllm")
        start = r.get("engine_start_s", r.get("first_output_s"))
        vs_raw = f"{r['output_tok_s'] / raw['output_tok_s']:.3f}" if raw else "-"
        wall_vs_raw = f"{r['wall_s'] / raw['wall_s']:.3f}" if raw else "-"
        vs_peer = f"{r['whole_job_tok_s'] / peer['whole_job_tok_s']:.3f}" if peer else "-"
        start_note = "" if "engine_start_s" in r else " (first row out)"
        print(
            f"| {name} | {r['model']}{parallel(r)} | {r['rows']} | {start:.1f}{start_note} | {r['generate_s']:.1f} "
            f"| {r['output_tok_s']:.0f} | {vs_raw} | {r['wall_s']:.1f} | {wall_vs_raw} | {r['whole_job_tok_s']:.0f} "
            f"| {vs_peer} | {r['gpu_busy']} | {r['gpu_util_mean']} | {r['host_peak_gib']} |"
        )
    one, two = results.get("llm_assets"), results.get("llm_assets_2gpu")
    if one and two:
        print(
            "\nTwo engines against one, same machine: generation tok/s "
            f"{two['output_tok_s'] / one['output_tok_s']:.3f}x, "
            f"whole job {two['wall_s'] / one['wall_s']:.3f}x the time; placement {two.get('engine_placement')}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
