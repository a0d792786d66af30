from llm_assets import LLMPipeline, LocalFolderSource, vLLMEngineProcessorConfig

support = LLMPipeline(
    name="support",
    config=vLLMEngineProcessorConfig(
        model_source="meta-llama/Llama-3.2-1B-Instruct",
        engine_kwargs={"enable_lora": True, "max_lora_rank": 16, "max_loras": 4},  # required for LoRA rows
        dynamic_lora_loading_path="/models/adapters",  # /models/adapters/billing/, /models/adapters/tech/
    ),
    source=LocalFolderSource("/data/tickets"),
    preprocess=lambda row: {
        "ticket": row["text"],
        "model": row["team"],  # "billing" or "tech": that adapter; None: the base model
        "messages": [{"role": "user", "content": row["text"]}],
        "sampling_params": {"max_tokens": 128, "temperature": 0},
    },
)
