"""The CPU stages after the engine find Ray workers with their stages built: started while the
engine builds, on a Ray with CPUs to spare for them (16 logical CPUs here)."""

import re

import dagster as dg
import pytest

from tests.helpers.data import questions, write_jsonl
from tests.helpers.local_ray import init_local_ray
from tests.helpers.pipelines import (
    RANGE_END,
    RANGE_START,
    TASK_TIMES,
    log_messages,
    make_pipeline,
    make_resources,
    run_job,
)

pytestmark = pytest.mark.slow

CPUS = 16


@pytest.fixture()
def wide_ray():
    """A Ray of this test's own with 16 logical CPUs: room for every group's task slots and the
    engine, so Ray keeps the warmed workers (it keeps idle workers up to the node's CPU count)."""
    import ray

    had_session_ray = ray.is_initialized()
    if had_session_ray:
        ray.shutdown()
    init_local_ray(CPUS)
    try:
        yield
    finally:
        ray.shutdown()
        if had_session_ray:  # the tests' session Ray (conftest), as the other tests expect it
            init_local_ray()


def test_the_stages_after_the_engine_run_on_workers_warmed_while_the_engine_builds(wide_ray, tiny_model, tmp_path):
    for name in ("a", "b", "c"):
        write_jsonl(tmp_path / "landing" / f"{name}.jsonl", questions(8, name))
    pipeline = make_pipeline(tmp_path / "landing", tiny_model)
    with dg.instance_for_test() as instance:
        result = run_job(
            pipeline, make_resources(tmp_path / "storage"), instance, {RANGE_START: "a.jsonl", RANGE_END: "c.jsonl"}
        )
        messages = log_messages(instance, result.run_id)
    slots = CPUS // 4  # a group's tasks in flight: a quarter of the cluster's CPUs
    assert f"tiny: starting {slots} Ray worker(s) for detokenize, postprocess while the engines build" in messages
    ready = [m for m in messages if re.match(rf"tiny: {slots} Ray worker\(s\) for detokenize, postprocess ready", m)]
    assert len(ready) == 1, messages
    # The groups before the engine are not warmed: they start at once anyway.
    assert not any(re.match(r"tiny: starting \d+ Ray worker\(s\) for (preprocess|chat_template)", m) for m in messages)
    found = {m.group(1): m for m in map(TASK_TIMES.search, messages) if m}
    after_engine = found["detokenize, postprocess"]
    tasks, cold = int(after_engine.group(2)), int(after_engine.group(10))
    assert tasks == 6 and cold == 0, after_engine.group(0)  # 24 rows in batches of 4, none loading the tokenizer
