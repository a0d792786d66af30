from llm_assets import LLMPipeline, LocalFolderSource, vLLMEngineProcessorConfig

reviews = LLMPipeline(
    name="reviews",
    # The same fields and defaults as ray.data.llm's vLLMEngineProcessorConfig.
    config=vLLMEngineProcessorConfig(
        model_source="Qwen/Qwen2.5-7B-Instruct",  # a model folder, a .gguf file, or a hub id
        engine_kwargs={"max_model_len": 4096, "tensor_parallel_size": 1},
        concurrency=2,  # engine pool size (one actor per engine)
        batch_size=64,
        # Per-stage overrides: enabled, batch_size, concurrency, num_cpus, memory, runtime_env.
        tokenize_stage={"batch_size": 256},
    ),
    source=LocalFolderSource("/data/reviews/landing", pattern="*.jsonl"),  # also *.parquet, *.csv
    preprocess=lambda row: {
        "review": row["text"],
        "messages": [{"role": "user", "content": f"Summarize: {row['text']}"}],
        "sampling_params": {"max_tokens": 128, "temperature": 0.2},
    },
    postprocess=lambda row: {"review": row["review"], "summary": row["generated_text"]},
    description="Review summaries",
)
