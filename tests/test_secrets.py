"""Tokens and API keys given through the config's runtime_env (for the engine actors and the CPU
stages) and the process environment never reach Dagster's event log (messages, metadata, check
results, failures), the run's record, Ray's session logs, the written files, or a config error.
(S3 keys: test_s3.py.)"""

from pathlib import Path

import pytest
import ray
from pydantic import ValidationError

from llm_assets import vLLMEngineProcessorConfig
from tests.helpers.data import write_jsonl
from tests.helpers.pipelines import fake_pipeline, make_resources, run_job, to_chat

HF_TOKEN = "hf_configSecret8c41e0d7"
API_KEY = "sk-apiSecret5b2f9aa1"
ENV_TOKEN = "hf_envSecret0e77d3c2"
SECRETS = (HF_TOKEN, API_KEY, ENV_TOKEN)


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"runtime_env": f"HF_TOKEN={HF_TOKEN}"}, "runtime_env"),  # a string where a dict belongs
        (
            {
                "prepare_multimodal_stage": True,
                "chat_template_stage": False,
                "runtime_env": {"env_vars": {"HF_TOKEN": HF_TOKEN}},
            },
            "prepare_multimodal_stage",
        ),
    ],
)
def test_a_config_error_does_not_echo_the_values_given(fields, named):
    # pydantic's default shows each failing input (a model-level error: the whole dict, its tail
    # included); both cases printed the token before the config models hid inputs.
    with pytest.raises(ValidationError) as error:
        vLLMEngineProcessorConfig(model_source="m", **fields)
    assert named in str(error.value) and not leaked(str(error.value))


def test_tokens_and_api_keys_reach_no_log_metadata_failure_or_output(
    tmp_path, fake_model, ray_session, instance, monkeypatch
):
    from dagster._serdes import serialize_value

    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", ENV_TOKEN)
    # The engine refuses the second row's sampling params: its request fails and the run fails
    # naming it, so a failure message is checked too.
    write_jsonl(tmp_path / "landing" / "x.jsonl", [{"question": "fine"}, {"question": "odd"}])

    def odd_params(row):
        chat = to_chat(row)
        if row["question"] == "odd":
            chat["sampling_params"] = {**chat["sampling_params"], "top_p": 5}
        return chat

    pipeline = fake_pipeline(
        tmp_path / "landing",
        fake_model,
        preprocess=odd_params,
        runtime_env={"env_vars": {"HF_TOKEN": HF_TOKEN, "OPENAI_API_KEY": API_KEY}},
    )
    result = run_job(
        pipeline, make_resources(tmp_path / "storage"), instance, {"dagster/partition": "x.jsonl"}, raise_on_error=False
    )

    assert not result.success
    records = instance.all_logs(result.run_id)
    failure = next(r for r in records if r.dagster_event and r.dagster_event.event_type_value == "STEP_FAILURE")
    assert "row 'x.jsonl:1'" in failure.dagster_event.step_failure_data.error.to_string()
    assert any(r.dagster_event and r.dagster_event.event_type_value == "ASSET_MATERIALIZATION" for r in records)
    assert not leaked("\n".join(serialize_value(r) for r in records))
    assert not leaked(serialize_value(instance.get_run_by_id(result.run_id)))
    # Ray writes the runtime_envs it creates (and each task's or actor's options) to its logs.
    ray_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    logged = [p for p in ray_logs.rglob("*") if p.is_file()]
    assert any("runtime_env" in p.name for p in logged)
    for path in logged:
        assert not leaked(path.read_bytes().decode("latin-1")), path
    written = [p for p in (tmp_path / "storage").rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in written)
    for path in written:
        assert not leaked(path.read_bytes().decode("latin-1")), path
