from llm_assets import LLMPipeline, LocalFolderSource, vLLMEngineProcessorConfig

# A Parquet dataset with one folder per day (events/date=2026-12-01/part-0.parquet, part-1.parquet,
# ...): each folder is one partition, "date=2026-12-01", and its rows carry a "date" column.
# S3PrefixSource takes partition_by="folder" too.
events = LLMPipeline(
    name="events",
    config=vLLMEngineProcessorConfig(model_source="Qwen/Qwen2.5-0.5B-Instruct", engine_kwargs={"max_model_len": 4096}),
    source=LocalFolderSource("/data/events", pattern="*.parquet", partition_by="folder"),
    preprocess=lambda row: {
        "date": row["date"],
        "messages": [{"role": "user", "content": f"Summarize this event: {row['text']}"}],
        "sampling_params": {"max_tokens": 128, "temperature": 0},
    },
    postprocess=lambda row: {"date": row["date"], "summary": row["generated_text"]},
)
