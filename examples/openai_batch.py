from llm_assets import LLMPipeline, LocalFolderSource, vLLMEngineProcessorConfig

# Landed files are OpenAI Batch request files (lines with custom_id, method, url, body); their rows
# already carry messages (or prompt) and sampling_params, so no preprocess is needed.
batches = LLMPipeline(
    name="batches",
    config=vLLMEngineProcessorConfig(model_source="Qwen/Qwen2.5-0.5B-Instruct", engine_kwargs={"max_model_len": 4096}),
    source=LocalFolderSource("/data/batches", pattern="*.jsonl"),
    openai_batch_output="s3://bucket/results",  # or a local folder: {file}.output.jsonl, {file}.errors.jsonl
)
