"""The response cache: a request answered before (same model, engine settings, prompt tokens and
sampling params) is answered from the pipeline's storage, across partitions and runs, and the
output equals an uncached run's. Real Dagster runs on the fake engine: what is tested is which
requests the cache answers and that its answers are the engine's, whatever the engine computes."""

import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from llm_assets.execution.cache import CacheSettings, request_keys
from llm_assets.rows import ERROR_COLUMN
from tests.helpers.data import questions, write_jsonl
from tests.helpers.pipelines import (
    MAX_TOKENS,
    engine_starts,
    fake_pipeline,
    log_messages,
    make_resources,
    read_output,
    run_job,
    to_answer,
)

N = 16


def answer_and_error(row):
    """A postprocess as ray.data.llm's users write one: it reads the engine's error column, '' for a
    good row, whether the engine or the cache answered it, and takes the answer to be text."""
    return {**to_answer(row), "error": row[ERROR_COLUMN], "start": row["generated_text"][:8]}


def engine_output(resources, partition) -> dict[str, dict]:
    """The engine's rows of a partition by question."""
    return {row["question"]: row for row in read_output(resources["storage"].store(), "engine", partition)}


def engine_metadata(instance, run_id) -> dict:
    for event in instance.all_logs(run_id):
        materialization = event.asset_materialization
        if materialization is not None and materialization.asset_key.path[-1] == "engine":
            return {key: value.value for key, value in materialization.metadata.items()}
    raise AssertionError("the run materialized no engine stage")


def rows_cached(instance, run_id) -> int:
    return engine_metadata(instance, run_id).get("rows_cached", 0)


@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory, fake_model, ray_session):
    """a.jsonl, then b.jsonl sharing half its questions, then c.jsonl: a.jsonl landed again."""
    import dagster as dg

    root = tmp_path_factory.mktemp("cache")
    landing = root / "landing"
    write_jsonl(landing / "a.jsonl", questions(N, "q"))
    pipeline = fake_pipeline(landing, fake_model, postprocess=answer_and_error)
    resources = make_resources(root / "storage")
    with dg.instance_for_test() as instance:
        runs = {"a": run_job(pipeline, resources, instance, {"dagster/partition": "a.jsonl"})}
        shared, new = questions(N, "q")[N // 2 :], questions(N // 2, "new")
        write_jsonl(landing / "b.jsonl", shared + new)
        runs["b"] = run_job(pipeline, resources, instance, {"dagster/partition": "b.jsonl"})
        shutil.copy(landing / "a.jsonl", landing / "c.jsonl")
        runs["c"] = run_job(pipeline, resources, instance, {"dagster/partition": "c.jsonl"})
        # The same b.jsonl through a pipeline without the cache, into storage of its own.
        uncached = make_resources(root / "uncached")
        pipeline.response_cache = "off"
        runs["b_uncached"] = run_job(pipeline, uncached, instance, {"dagster/partition": "b.jsonl"})
        yield {
            "instance": instance,
            "runs": runs,
            "resources": resources,
            "uncached": uncached,
            "shared": {q["question"] for q in shared},
            "new": {q["question"] for q in new},
        }


def test_the_first_run_answers_everything_with_the_engine(cached_runs):
    instance, run = cached_runs["instance"], cached_runs["runs"]["a"]
    assert rows_cached(instance, run.run_id) == 0
    assert engine_starts(instance, run.run_id) == 1


def test_overlapping_prompts_of_a_later_file_are_answered_from_the_cache(cached_runs):
    instance, run = cached_runs["instance"], cached_runs["runs"]["b"]
    assert rows_cached(instance, run.run_id) == N // 2
    rows = engine_output(cached_runs["resources"], "b.jsonl")
    assert len(rows) == N
    from_cache = {q for q, row in rows.items() if row["request_id"].endswith("#cached")}
    assert from_cache == cached_runs["shared"]
    assert all(rows[q]["time_taken_llm"] == 0.0 for q in from_cache)
    assert all(rows[q]["time_taken_llm"] > 0.0 for q in cached_runs["new"])
    # Rows keep the file's order, cached or not.
    ids = [row["row_id"] for row in read_output(cached_runs["resources"]["storage"].store(), "engine", "b.jsonl")]
    assert ids == [f"b.jsonl:{i}" for i in range(N)]
    messages = log_messages(instance, run.run_id)
    assert any(f"{N // 2} of them answered from the response cache" in m for m in messages)
    # The file starts with rows the cache answers, and has rows to generate: the engine actors
    # start with the run, before the first batch's lookup.
    loading = next(i for i, m in enumerate(messages) if m.startswith("Fake for ") and ": 1 engine actor(s) (" in m)
    looked_up = next(i for i, m in enumerate(messages) if m.startswith("Response cache (deterministic requests):"))
    assert loading < looked_up
    # Generated tokens count the generated rows only.
    assert engine_metadata(instance, run.run_id)["generated_tokens"] == N // 2 * MAX_TOKENS


def test_cached_output_equals_an_uncached_run(cached_runs):
    cached = {
        r["question"]: r for r in read_output(cached_runs["resources"]["storage"].store(), "postprocess", "b.jsonl")
    }
    uncached = {
        r["question"]: r for r in read_output(cached_runs["uncached"]["storage"].store(), "postprocess", "b.jsonl")
    }
    assert cached.keys() == uncached.keys() and len(cached) == N
    assert cached == uncached
    cached_engine, uncached_engine = (
        engine_output(cached_runs["resources"], "b.jsonl"),
        engine_output(cached_runs["uncached"], "b.jsonl"),
    )
    for question, row in cached_engine.items():
        assert row[ERROR_COLUMN] == uncached_engine[question][ERROR_COLUMN] == "", question
        assert row["generated_tokens"] == uncached_engine[question]["generated_tokens"], question
        assert row["num_input_tokens"] == uncached_engine[question]["num_input_tokens"], question


def test_a_file_landed_twice_costs_no_engine_at_all(cached_runs):
    instance, run = cached_runs["instance"], cached_runs["runs"]["c"]
    metadata = engine_metadata(instance, run.run_id)
    assert metadata["rows_cached"] == N and metadata["generated_tokens"] == 0 and metadata["engine_seconds"] == 0
    # No engine actor at all: none was created (none would have imported an engine library).
    messages = log_messages(instance, run.run_id)
    assert not any(m.startswith("Fake for ") for m in messages) and engine_starts(instance, run.run_id) == 0
    assert any(
        "the response cache answers a sample of this run's rows: the run starts no engine" in m for m in messages
    )
    rows = read_output(cached_runs["resources"]["storage"].store(), "postprocess", "c.jsonl")
    assert len(rows) == N and all(row["error"] == "" for row in rows)


def test_a_run_without_the_cache_reads_and_stores_nothing(cached_runs):
    instance, run = cached_runs["instance"], cached_runs["runs"]["b_uncached"]
    assert rows_cached(instance, run.run_id) == 0
    assert not list(Path(cached_runs["uncached"]["storage"].store().root).glob("_response_cache/*/*"))


SETTINGS = CacheSettings("scope", "/nowhere", "deterministic", pooling=False, answer_columns=(), per_request_columns=())


@pytest.mark.parametrize(
    "params, error, settings, cached",
    [
        ('{"temperature": 0, "max_tokens": 8}', None, SETTINGS, True),
        ('{"temperature": 0.7, "seed": 3}', None, SETTINGS, True),
        ('{"temperature": 0.7}', None, SETTINGS, False),
        ("{}", None, SETTINGS, False),  # vLLM's default temperature is 1
        ('{"temperature": 0.7}', None, CacheSettings(**{**SETTINGS.__dict__, "mode": "all"}), True),
        (None, None, CacheSettings(**{**SETTINGS.__dict__, "pooling": True}), True),
        ('{"temperature": 0}', "preprocess: bad row", SETTINGS, False),
    ],
)
def test_only_deterministic_requests_get_a_key(params, error, settings, cached):
    table = pa.table(
        {"tokenized_prompt": [[1, 2, 3]], "sampling_params": [params], ERROR_COLUMN: pa.array([error], pa.string())}
    )
    assert request_keys(table, settings)[0].is_valid == cached


def test_keys_follow_the_request_not_its_spelling():
    table = pa.table(
        {
            "tokenized_prompt": [[1, 2, 3], [1, 2, 3], [1, 2, 4], [1, 2, 3]],
            "sampling_params": [
                '{"temperature": 0, "max_tokens": 8}',
                '{"max_tokens": 8, "temperature": 0}',
                '{"temperature": 0, "max_tokens": 8}',
                '{"temperature": 0, "max_tokens": 9}',
            ],
        }
    )
    keys = request_keys(table, SETTINGS).to_pylist()
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3]}) == 3
    other_scope = request_keys(table, CacheSettings(**{**SETTINGS.__dict__, "scope": "another model"})).to_pylist()
    assert other_scope[0] != keys[0]


def test_rows_with_the_same_tokens_and_other_images_get_other_keys():
    """An image is one placeholder token in the prompt: the key holds each medium's digest, not
    where it was read from."""
    from llm_assets.stages import media

    def item(sha, uri):
        return {"modality": "image", "uri": uri, "mime_type": "image/png", "sha256": sha, "data": None}

    table = pa.table(
        {
            "tokenized_prompt": [[1, 2, 3]] * 4,
            "sampling_params": ['{"temperature": 0}'] * 4,
            media.COLUMN: pa.array(
                [
                    [item("aa", "http://h/red.png")],
                    [item("bb", "http://h/blue.png")],
                    [item("aa", "/data/red-copy.png")],
                    None,
                ],
                media.COLUMN_TYPE,
            ),
        }
    )
    keys = request_keys(table, SETTINGS).to_pylist()
    assert keys[0] == keys[2] and len({keys[0], keys[1], keys[3]}) == 3


def test_an_unreadable_answer_file_fails_naming_it(tmp_path):
    import pyarrow.fs as pafs

    from llm_assets.execution.cache import KEY, CacheLookup

    table = pa.table({"row_id": ["x:0"], "tokenized_prompt": [[1, 2, 3]], "sampling_params": ['{"temperature": 0}']})
    key = request_keys(table, SETTINGS)[0].as_py()
    broken = tmp_path / "seg-broken.parquet"
    broken.write_bytes(b"not parquet")
    index = pa.table({KEY: pa.array([key], pa.binary(16)), "segment": [str(broken)]})
    with pytest.raises(RuntimeError, match=f"response cache's file {broken} cannot be read.*response_cache='off'"):
        CacheLookup(index, SETTINGS, pafs.LocalFileSystem())(table)


def test_a_file_with_one_new_row_the_sample_missed_is_finished_with_an_engine(tmp_path, fake_model, ray_session):
    """A file landed again with one new row at its end: a sample of its rows is all answered, so the
    run starts without engines, finds the new row unanswered, and takes the partition again with an
    engine, keeping the rows already written. The row never reaches the stages after the engine
    unanswered (its partition is not failed on the way), and the second pass finishes it."""
    import dagster as dg

    landing = tmp_path / "landing"
    write_jsonl(landing / "a.jsonl", questions(200, "q"))
    pipeline = fake_pipeline(landing, fake_model, postprocess=answer_and_error)
    resources = make_resources(tmp_path / "storage")
    with dg.instance_for_test() as instance:
        assert run_job(pipeline, resources, instance, {"dagster/partition": "a.jsonl"}).success
        write_jsonl(landing / "a.jsonl", questions(200, "q") + questions(1, "new"))
        run = run_job(pipeline, resources, instance, {"dagster/partition": "a.jsonl"}, raise_on_error=False)
        messages = log_messages(instance, run.run_id)
        assert any("the run starts no engine" in m for m in messages)  # the case this test is about
        assert not any(m.startswith("[a.jsonl] failed") for m in messages), [m for m in messages if "failed" in m]
        assert run.success
        assert any("1 partition(s) had rows the response cache did not answer (a.jsonl)" in m for m in messages)
        # The second pass keeps the 200 rows the first wrote; none is counted as answered from the cache
        # twice, and nothing unanswered was stored as an answer: the cache answers the new row now.
        metadata = engine_metadata(instance, run.run_id)
        assert metadata["rows_resumed"] == 200 and metadata.get("rows_cached", 0) == 0, metadata
        write_jsonl(landing / "b.jsonl", questions(1, "new"))
        again = run_job(pipeline, resources, instance, {"dagster/partition": "b.jsonl"})
        assert rows_cached(instance, again.run_id) == 1 and engine_starts(instance, again.run_id) == 0
    rows = read_output(resources["storage"].store(), "postprocess", "a.jsonl")
    # Every row once (in the input's order within each file; across files, see limits.md).
    assert sorted(r["row_id"] for r in rows) == sorted(f"a.jsonl:{i}" for i in range(201))
    assert all(r["answer"] and r["error"] == "" for r in rows)
    (new,) = read_output(resources["storage"].store(), "postprocess", "b.jsonl")
    assert new["answer"] == next(r["answer"] for r in rows if r["row_id"] == "a.jsonl:200")
    assert new["tokens"] == MAX_TOKENS
