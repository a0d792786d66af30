"""What a run that makes no progress waits for, from Ray's own state.

A run that finishes no batch for ``stall_report_s`` (a ``RayDataResource`` setting) logs one line,
and again as long as that lasts: what each engine is doing (not placed by Ray yet, importing,
building, rows in flight), the CPU tasks each step has in flight and queued, the cluster's free
CPUs and GPUs, and how full Ray's object store is. A run the cluster could never schedule fails
at once instead (``steps.unschedulable``); this is for a cluster that is busy (another run holds
the GPU), slow, or short of memory.
"""

from __future__ import annotations

import re
from typing import Optional

from llm_assets.engines.pool import first_line
from llm_assets.private_apis import ray_object_store_summary


def stall_report(name: str, silent_s: float, steps: list, pool, queued_rows: int) -> str:
    import ray

    parts = [f"free in the Ray cluster: {_free(ray.available_resources(), ray.cluster_resources())}"]
    if pool is not None:
        parts.extend(pool.states())
    if queued_rows:
        parts.append(f"{queued_rows} rows queued for the engines")
    for step in steps:
        if step is not None and (step.in_flight or step.queue):
            stages = step.label()
            cpus = step.options.get("num_cpus") or 1
            parts.append(
                f"{stages}: {len(step.in_flight)} task(s) in flight ({cpus:g} CPU each), "
                f"{len(step.queue)} batch(es) queued"
            )
    store = _object_store()
    if store:
        parts.append(store)
    return f"{name}: no batch finished for {silent_s:.0f} s; " + "; ".join(parts)


def _free(free: dict, total: dict) -> str:
    return (
        ", ".join(f"{free.get(key, 0):g} of {total[key]:g} {key}(s)" for key in ("CPU", "GPU") if total.get(key))
        or "nothing"
    )


def _object_store() -> Optional[str]:
    """Ray's own object store summary (what ``ray memory --stats-only`` prints): no public API gives it."""
    import ray

    try:
        text = ray_object_store_summary(ray.get_runtime_context().gcs_address)
    except Exception as exc:  # a Ray without this private helper: say so instead of the figure
        return f"object store usage unknown ({first_line(exc)})"
    used = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects, ([\d.]+)% full", text)
    spilled = re.search(r"Spilled (\d+) MiB, (\d+) objects", text)
    line = f"Ray's object store {used.group(3)}% full ({used.group(1)} MiB, {used.group(2)} objects)" if used else None
    if spilled:
        line = f"{line or 'Ray object store'}, {spilled.group(1)} MiB spilled to disk"
    return line
