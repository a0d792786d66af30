from typing import Literal

from pydantic import BaseModel, Field

from llm_assets import LLMPipeline, LocalFolderSource, vLLMEngineProcessorConfig


class Review(BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]
    stars: int = Field(ge=1, le=5)


def preprocess(row):
    messages = [{"role": "user", "content": f"Rate this review as JSON: {row['text']}"}]
    return {"messages": messages, "sampling_params": {"max_tokens": 64, "temperature": 0}}


def postprocess(row):
    return {"review": Review.model_validate_json(row["generated_text"]).model_dump()}


reviews = LLMPipeline(
    name="reviews",
    config=vLLMEngineProcessorConfig(model_source="Qwen/Qwen2.5-0.5B-Instruct"),
    source=LocalFolderSource("/data/reviews/landing"),
    preprocess=preprocess,
    postprocess=postprocess,
    output_schema=Review,  # rows that set no structured_outputs get its schema
)
