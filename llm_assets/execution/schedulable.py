"""Whether the Ray cluster could ever run a chain: Ray would keep an operator's actors pending
forever otherwise. A run the cluster could never schedule fails at once, naming the resource; a
cluster that is only busy (another run holds the GPU) is the stall report's business."""

from __future__ import annotations

from typing import Optional

from llm_assets.tasks import ENGINE


def stage_cpus(pipeline, chain: list[str]) -> dict[str, float]:
    """The logical CPUs each CPU stage's workers reserve."""
    return {stage: float(pipeline.plan(stage).settings.num_cpus or 0) for stage in chain if stage != ENGINE}


def unschedulable(
    cpus: dict[str, float], nodes: list[dict[str, float]], engines: Optional[dict[str, float]]
) -> Optional[str]:
    """Why a chain whose stages reserve ``cpus`` could never run on these nodes (their total
    resources), if it could not. ``engines``: what the engines reserve in all (``CPU``, ``GPU``)
    and per actor (``CPU_each``, ``GPU_each``)."""
    largest = {key: max((node.get(key, 0.0) for node in nodes), default=0.0) for key in ("CPU", "GPU")}
    total = {key: sum(node.get(key, 0.0) for node in nodes) for key in ("CPU", "GPU")}
    if engines:
        for key in ("CPU", "GPU"):
            if engines[f"{key}_each"] > largest[key]:
                return (
                    f"each engine asks for {engines[f'{key}_each']:g} {_unit(key)}; "
                    f"the largest node of the Ray cluster has {largest[key]:g}"
                )
            if engines[key] > total[key]:
                return f"the engines ask for {engines[key]:g} {_unit(key)} in all; the Ray cluster has {total[key]:g}"
    held = engines["CPU"] if engines and len(nodes) == 1 else 0.0  # on one node the engines' CPUs are never free
    for stage, need in cpus.items():
        if need > largest["CPU"] - held:
            beside = f", {held:g} of them held by the engines for the whole run" if held else ""
            return (
                f"stage(s) {stage} ask for {need:g} logical CPU(s) per worker; "
                f"the largest node of the Ray cluster has {largest['CPU']:g}{beside}"
            )
    return None


def pools_overcommit(held: list[tuple[str, float]], engines_cpus: float, cluster_cpus: float) -> Optional[str]:
    """Why the actors a run's dataset starts at once (``held``: each CPU operator's smallest pool;
    the engines) could never all be placed, if they could not: Ray Data starts every actor pool
    with the execution and keeps it to its end, so an operator whose actor waits for a CPU would
    hold every row after it forever."""
    total = engines_cpus + sum(cpus for _, cpus in held)
    if total <= cluster_cpus + 1e-9:
        return None
    parts = ([f"engines {engines_cpus:g}"] if engines_cpus else []) + [f"{name} {cpus:g}" for name, cpus in held]
    return (
        f"its engines and the smallest pools of its stages' actors, which Ray Data starts at once and keeps "
        f"for the whole run, need {total:g} of the Ray cluster's {cluster_cpus:g} logical CPU(s) ({', '.join(parts)})"
    )


def _unit(key: str) -> str:
    return "logical CPU(s)" if key == "CPU" else "GPU(s)"


def check_schedulable(
    pipeline, chain: list[str], engines: Optional[dict[str, float]], held: list[tuple[str, float]]
) -> None:
    """Fail at once, naming the resource, when the cluster could never run a stage, hold the
    engines, or hold the actors the run starts at once (``held``)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problem = unschedulable(stage_cpus(pipeline, chain), nodes, engines)
    advice = "Lower the setting"
    if problem is None:
        cluster_cpus = sum(node.get("CPU", 0.0) for node in nodes)
        problem = pools_overcommit(held, engines["CPU"] if engines else 0.0, cluster_cpus)
        advice = (
            "Lower a stage's num_cpus or concurrency, give consecutive stages the same settings (one "
            "operator), run fewer engines (or a lower num_cpus_per_engine)"
        )
    if problem:
        raise RuntimeError(
            f"{pipeline.name}: this run cannot be scheduled: {problem}. {advice} or add resources (Ray's "
            "CPUs are logical: a local Ray has max(4, cores) of them unless RayDataResource(num_cpus=...) says)."
        )
