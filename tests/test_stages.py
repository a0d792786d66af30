"""Each stage UDF on its own: no Dagster, no Ray, the tiny model's real tokenizer."""

import json

import pyarrow as pa
import pytest

from llm_assets.rows import ERROR_COLUMN, RowError, table_of
from llm_assets.stages.chat_template import ChatTemplateStage
from llm_assets.stages.detokenize import DetokenizeStage
from llm_assets.stages.postprocess import PostprocessStage
from llm_assets.stages.tokenize import TokenizeStage
from tests.helpers.models import model_without_chat_template
from tests.helpers.stages import preprocess_stage


def to_chat(row):
    return {"messages": [{"role": "user", "content": row["q"]}], "sampling_params": {"max_tokens": 4}}


def test_preprocess_applies_the_function_and_keeps_row_ids():
    out = preprocess_stage(to_chat)(pa.table({"row_id": ["a", "b"], "q": ["hi", "there"]}))
    rows = out.to_pylist()
    assert [r["row_id"] for r in rows] == ["a", "b"]
    assert rows[1]["messages"] == [{"role": "user", "content": "there"}]
    assert json.loads(rows[0]["sampling_params"]) == {"max_tokens": 4}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"q": "hi"}, "row 'r1': has neither 'messages' nor 'prompt'"),
        ({"messages": "hello"}, "'messages' is str"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role is 'robot'"),
        ({"prompt": "x", "sampling_params": {"max_tokens": 0}}, "max_tokens is 0: expected an integer >= 1"),
        ({"prompt": ""}, "'prompt' is empty"),
        (
            {"prompt": "x", "sampling_params": "greedy"},
            "'sampling_params' is the text 'greedy': expected a dict of sampling settings",
        ),
        ({"prompt": "x", "sampling_params": "[1]"}, "'sampling_params' is the text '[1]': expected a dict"),
        ({"prompt": "x", "sampling_params": [1]}, "'sampling_params' is list '[1]': expected a dict"),
        (
            {"messages": [{"role": "user", "content": 7}]},
            "messages[0].content is int 7: expected the message's text as a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
            "a list of content parts: expected the message's text",
        ),
    ],
)
def test_preprocess_rejects_bad_rows_naming_the_row(row, message):
    batch = table_of([{"row_id": "r0", "prompt": "fine"}, {"row_id": "r1", **row}])
    with pytest.raises(RowError, match="preprocess: row 'r1'") as info:
        preprocess_stage()(batch)
    assert message in str(info.value)


def test_preprocess_function_errors_name_the_row():
    with pytest.raises(RowError, match="row 'b': the preprocess function raised KeyError"):
        preprocess_stage(lambda row: {"prompt": row["missing"]})(pa.table({"row_id": ["b"], "q": ["x"]}))


def test_chat_template_adds_a_generation_prompt_only_after_a_user_message(tiny_model):
    batch = table_of(
        [
            {"row_id": "u", "messages": [{"role": "user", "content": "Hi"}]},
            {"row_id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]},
        ]
    )
    prompts = ChatTemplateStage(tiny_model)(batch).column("prompt").to_pylist()
    assert prompts[0] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # A trailing assistant message is continued (prefill), not closed and followed by a new turn.
    assert prompts[1].endswith("<|im_start|>assistant\nHel")


def test_chat_template_missing_is_a_clear_error(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="has no chat template"):
        ChatTemplateStage(model_without_chat_template(tiny_model, tmp_path / "no-template"))


def test_tokenize_then_detokenize_round_trips(tiny_model):
    batch = table_of(
        [
            {"row_id": "t", "messages": [{"role": "user", "content": "x"}], "prompt": "<|im_start|>user\nhello world"},
            {"row_id": "p", "messages": None, "prompt": "hello world"},
        ]
    )
    tokenized = TokenizeStage(tiny_model)(batch)
    ids = tokenized.column("tokenized_prompt").to_pylist()
    assert ids[0][0] == 1  # <|im_start|> from the template text, no BOS added to templated text
    assert ids[1][0] == 0  # a raw prompt gets the tokenizer's BOS, as vLLM would add it
    engine_like = tokenized.append_column("generated_tokens", pa.array([ids[0], ids[1]]))
    texts = DetokenizeStage(tiny_model)(engine_like).column("generated_text").to_pylist()
    assert texts == ["user\nhello world", "hello world"]


def test_postprocess_passes_failed_rows_through_untouched():
    batch = table_of(
        [
            {"row_id": "ok", "generated_text": " hi ", ERROR_COLUMN: None},
            {"row_id": "bad", "generated_text": None, ERROR_COLUMN: "ValueError: too long"},
        ]
    )
    rows = PostprocessStage(lambda row: {"answer": row["generated_text"].strip()})(batch).to_pylist()
    assert rows[0] == {"answer": "hi", "row_id": "ok", "generated_text": None, ERROR_COLUMN: None}
    assert rows[1]["row_id"] == "bad" and rows[1][ERROR_COLUMN] == "ValueError: too long"


def test_with_should_continue_on_error_the_output_is_ray_data_llms():
    """ray.data.llm 2.60, run on one file with a failing row (a prompt past max_model_len): a good
    row is the function's output with __inference_error__ "", a failed row bypasses the function
    and keeps every column it had, its input columns and the stages' columns."""
    batch = table_of(
        [
            {
                "row_id": "ok",
                "id": 0,
                "prompt": "p",
                "generated_text": " hi ",
                "num_generated_tokens": 2,
                ERROR_COLUMN: None,
            },
            {
                "row_id": "bad",
                "id": 1,
                "prompt": "long",
                "generated_text": None,
                "num_generated_tokens": None,
                ERROR_COLUMN: "VLLMValidationError: the prompt is too long",
            },
        ]
    )
    good, bad = PostprocessStage(
        lambda row: {"id": row["id"], "answer": row["generated_text"].strip()}, should_continue_on_error=True
    )(batch).to_pylist()
    assert {k: v for k, v in good.items() if v is not None} == {
        "id": 0,
        "answer": "hi",
        "row_id": "ok",
        ERROR_COLUMN: "",
    }
    assert {k: v for k, v in bad.items() if v is not None} == {
        "id": 1,
        "row_id": "bad",
        "prompt": "long",
        ERROR_COLUMN: "VLLMValidationError: the prompt is too long",
    }


def test_postprocess_gives_sampling_params_back_as_the_dict_they_were():
    seen = []

    def keep(row):
        seen.append(row["sampling_params"])
        return {"params": row["sampling_params"]}

    params = {"max_tokens": 4, "temperature": 0.0, "stop": ["\n"]}
    batch = table_of([{"row_id": "r0", "sampling_params": json.dumps(params), "generated_text": "x"}])
    assert seen == [] and PostprocessStage(keep)(batch).to_pylist() == [{"params": params, "row_id": "r0"}]
    assert seen == [params]
    assert PostprocessStage()(batch).column("sampling_params").to_pylist() == [params]


def test_the_tokenizer_stages_run_without_torch_and_tokenize_as_auto_tokenizer(tiny_model):
    """A tokenizer-stage worker loads the class the model's tokenizer_config.json names: the same
    class AutoTokenizer picks, without the model configurations (and torch) it imports, about 340 MB
    of each worker's memory. Run in a fresh interpreter, where nothing imported torch before."""
    import subprocess
    import sys

    script = f"""
import json, sys
import pyarrow as pa
from llm_assets.rows import table_of
from llm_assets.stages.chat_template import ChatTemplateStage
from llm_assets.stages.detokenize import DetokenizeStage
from llm_assets.stages.tokenize import TokenizeStage
model = {tiny_model!r}
batch = table_of([{{"row_id": "t", "messages": [{{"role": "user", "content": "Hello, wörld 😀"}}]}},
                  {{"row_id": "p", "messages": None, "prompt": "a raw prompt"}}])
prompts = ChatTemplateStage(model)(batch.drop_columns(["prompt"]).slice(0, 1)).column("prompt").to_pylist()
tokenized = TokenizeStage(model)(batch.set_column(2, "prompt", pa.array([prompts[0], "a raw prompt"])))
ids = tokenized.column("tokenized_prompt").to_pylist()
texts = DetokenizeStage(model)(tokenized.append_column("generated_tokens", pa.array(ids))).column("generated_text")
print(json.dumps({{"torch": "torch" in sys.modules, "prompt": prompts[0], "ids": ids, "texts": texts.to_pylist()}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] is False

    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "Hello, wörld 😀"}]
    assert result["prompt"] == auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert result["ids"] == [
        auto(result["prompt"], add_special_tokens=False)["input_ids"],
        auto("a raw prompt")["input_ids"],
    ]
    assert result["texts"] == [auto.decode(ids, skip_special_tokens=True) for ids in result["ids"]]
