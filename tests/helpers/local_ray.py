"""The tests' own Ray."""

from __future__ import annotations


def init_local_ray(num_cpus: int = 4) -> None:
    """A Ray of the tests' own ("local": even while a `ray start` cluster runs on this machine);
    4 logical CPUs unless a test asks for more."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace="llm_assets_tests")
