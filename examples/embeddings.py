from llm_assets import LLMPipeline, LocalFolderSource, vLLMEngineProcessorConfig

embedder = LLMPipeline(
    name="sentences",
    config=vLLMEngineProcessorConfig(model_source="sentence-transformers/all-MiniLM-L6-v2", task_type="embed"),
    source=LocalFolderSource("/data/sentences"),
    preprocess=lambda row: {"id": row["id"], "prompt": row["text"]},
)
