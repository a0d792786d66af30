from llm_assets import LLMPipeline, LocalFolderSource, vLLMEngineProcessorConfig


def preprocess(row):
    messages = [{"role": "user", "content": f"Summarize: {row['text']}"}]
    return {"review": row["text"], "messages": messages, "sampling_params": {"max_tokens": 128}}


def postprocess(row):
    return {"review": row["review"], "summary": row["generated_text"]}


reviews = LLMPipeline(
    name="reviews",
    config=vLLMEngineProcessorConfig(model_source="Qwen/Qwen2.5-0.5B-Instruct", batch_size=64),
    source=LocalFolderSource("/data/reviews/landing", pattern="*.jsonl"),
    preprocess=preprocess,
    postprocess=postprocess,
)
