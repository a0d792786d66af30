from llm_assets.demo.captions import captions_pipeline  # the whole example: llm_assets/demo/captions.py

pipeline = captions_pipeline("HuggingFaceTB/SmolVLM-256M-Instruct", "/data/images/landing")
# i.e. vLLMEngineProcessorConfig(model_source=..., engine_kwargs={"limit_mm_per_prompt": {"image": 1}, ...},
#      prepare_multimodal_stage={"enabled": True, "model_config_kwargs": {"limit_mm_per_prompt": {"image": 1}}})
# rows: {"image": "https://.../cat.jpg", "question": "..."} -> messages=[{"role": "user", "content": [
#      {"type": "image_url", "image_url": {"url": row["image"]}}, {"type": "text", "text": row["question"]}]}]
