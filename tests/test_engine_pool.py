"""The engine pool resource across the steps of one run process."""

import pytest
import ray

from llm_assets.models import resolve_model_source
from resources import RayDataResource
from resources.engine_pool import EnginePoolResource
from tests.test_pipeline_dagster import make_pipeline


def test_engines_released_by_one_step_are_ended_before_the_next_step_gets_its_own(tmp_path, tiny_model, ray_session):
    """A released pool shuts down without holding up its run; a pool asked for after it (the next
    step of an in-process run, say) waits until those engines are gone, so they never hold the
    GPUs the new engines claim."""
    resource = EnginePoolResource(ray_data=RayDataResource())
    pipeline = make_pipeline(tmp_path / "landing", tiny_model)
    model = resolve_model_source(tiny_model)
    first = resource.pool_for(pipeline, model, print)
    first_actors = [replica.actor for replica in first.replicas]
    ray.get([replica.placed_ref for replica in first.replicas])
    resource.release(first)
    assert first.shutting_down and first.replicas  # asked to stop, not waited for

    second = resource.pool_for(pipeline, model, print)
    assert first.replicas == []
    for actor in first_actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=30)
    resource.shutdown_engines()
    assert second.replicas == []
