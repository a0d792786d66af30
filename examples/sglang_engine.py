from llm_assets import SGLangEngineProcessorConfig

config = SGLangEngineProcessorConfig(  # ray.data.llm's fields
    model_source="meta-llama/Llama-3.2-1B-Instruct",
    # sglang.Engine's; defaults tp_size=1, dp_size=1, skip_tokenizer_init=True
    engine_kwargs={"context_length": 4096, "mem_fraction_static": 0.85},
    concurrency=1,
    batch_size=64,
    should_continue_on_error=True,  # honoured (ray.data.llm drops it for SGLang)
)
