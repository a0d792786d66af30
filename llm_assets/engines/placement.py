"""Where an engine replica's processes go: one Ray placement group per replica.

An engine that runs on several GPUs (vLLM with ``tensor_parallel_size`` x ``pipeline_parallel_size``
> 1) starts one worker per GPU. As ray.data.llm does, each replica then reserves one bundle per
worker as a single placement group (``placement_group_config``: ``bundle_per_worker`` or
``bundles``, and a ``strategy``), its engine actor is placed in the group's first bundle, and
vLLM's Ray executor, which finds the group from inside the actor, places its GPU workers in the
bundles: with PACK or SPREAD a replica may span nodes. Nothing here imports Dagster.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, model_validator

Bundle = dict[str, float]


class PlacementGroupConfig(BaseModel):
    """ray.data.llm's ``placement_group_config``: exactly one of ``bundle_per_worker`` (repeated
    once per engine worker: tensor x pipeline parallel size) and ``bundles``."""

    model_config = ConfigDict(extra="forbid")

    bundle_per_worker: Optional[Bundle] = None
    bundles: Optional[list[Bundle]] = None
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @model_validator(mode="after")
    def _one_bundle_option(self):
        if (self.bundle_per_worker is None) == (self.bundles is None):
            raise ValueError(
                "placement_group_config needs exactly one of 'bundle_per_worker' (repeated once per engine "
                "worker) and 'bundles' (the full list)"
            )
        for bundle in self.bundles or [self.bundle_per_worker]:
            if not bundle or any(amount < 0 for amount in bundle.values()):
                raise ValueError(
                    f"placement_group_config: a bundle needs resources >= 0 and at least one, got {bundle}"
                )
        return self

    def bundles_for(self, workers: int) -> list[Bundle]:
        return (
            [dict(b) for b in self.bundles]
            if self.bundles is not None
            else [dict(self.bundle_per_worker) for _ in range(workers)]
        )


@dataclass(frozen=True)
class ReplicaPlacement:
    """What one replica reserves. ``actor_gpus``: the GPUs the engine actor itself takes from the
    first bundle (0 where the engine's workers are Ray actors of their own, which take them)."""

    bundles: list[Bundle]
    strategy: str
    actor_gpus: float

    def describe(self) -> str:
        counts = Counter(tuple(sorted(b.items())) for b in self.bundles)
        shown = ", ".join(f"{n} x {dict(b)}" for b, n in counts.items())
        return f"{shown} ({self.strategy})"


def with_accelerator(placement: ReplicaPlacement, accelerator_type: Optional[str]) -> ReplicaPlacement:
    """Each bundle asks for the accelerator type (as ray.data.llm does), so the group lands on such nodes."""
    if not accelerator_type:
        return placement
    key = f"accelerator_type:{accelerator_type}"
    return ReplicaPlacement([{**b, key: 0.001} for b in placement.bundles], placement.strategy, placement.actor_gpus)


def check_fits(placement: ReplicaPlacement, replicas: int, label: str) -> None:
    """Refuse, before anything is reserved, a placement the cluster can never hold (Ray would
    leave the group pending for ever): the resources of all replicas' bundles against the
    cluster's; for STRICT_PACK, one replica's against the largest node."""
    import ray

    first = placement.bundles[0]
    if placement.actor_gpus > first.get("GPU", 0):
        raise ValueError(
            f"{label}: the engine runs in the first bundle of its placement group and needs "
            f"{placement.actor_gpus:g} GPU there; that bundle is {first}"
        )
    needed: Counter = Counter()
    for bundle in placement.bundles:
        needed.update(bundle)
    total = ray.cluster_resources()
    for resource, amount in needed.items():
        if amount * replicas > total.get(resource, 0) + 1e-9:
            raise ValueError(
                f"{label}: {replicas} engine(s) each reserving {placement.describe()} need {amount * replicas:g} "
                f"{resource}; the Ray cluster has {total.get(resource, 0):g}"
            )
    if placement.strategy == "STRICT_PACK":
        largest = max(
            (node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")),
            key=lambda r: r.get("GPU", 0),
            default={},
        )
        short = [r for r, amount in needed.items() if amount > largest.get(r, 0) + 1e-9]
        if short:
            raise ValueError(
                f"{label}: STRICT_PACK puts one engine's bundles {placement.describe()} on one node; no node "
                f"has enough {', '.join(short)}"
            )


def reserve(placement: ReplicaPlacement, num_cpus: float) -> tuple[Any, dict[str, Any]]:
    """A new placement group for one replica, and the Ray options that put its engine actor in the
    first bundle. Child tasks and actors (vLLM's workers) are placed in the group too."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = [dict(b) for b in placement.bundles]  # Ray's own copies
    group = ray.util.placement_group(bundles, strategy=placement.strategy)
    strategy = PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
    )
    # The actor must fit in its bundle: a bundle with no CPU (say {"GPU": 1}) takes an actor with none.
    options = {
        "scheduling_strategy": strategy,
        "num_cpus": min(num_cpus, bundles[0].get("CPU", 0)),
        "num_gpus": placement.actor_gpus,
    }
    return group, options


def release(group: Any, log) -> None:
    import ray

    try:
        ray.util.remove_placement_group(group)
    except Exception as exc:  # the cluster may be gone at the end of a run: what it held is freed with it
        log(f"(could not remove an engine's placement group: {exc})")


def bundle_nodes(group: Any) -> list[Optional[str]]:
    """The Ray node of each bundle of a placement group (None while not placed)."""
    from ray.util.placement_group import placement_group_table

    by_index = placement_group_table(group).get("bundles_to_node_id", {})
    return [by_index.get(i) for i in range(len(group.bundle_specs))]
