from llm_assets import LLMPipeline, LocalFolderSource, vLLMEngineProcessorConfig

rerank = LLMPipeline(
    name="rerank",
    config=vLLMEngineProcessorConfig(model_source="cross-encoder/ms-marco-MiniLM-L-6-v2", task_type="score"),
    source=LocalFolderSource("/data/candidates"),
    preprocess=lambda row: {"id": row["id"], "query": row["question"], "document": row["passage"]},
    postprocess=lambda row: {"id": row["id"], "relevance": row["score"]},
)
