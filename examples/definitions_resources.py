# A code location of your own: your pipelines and the three resources they share.
from dagster_aws.s3 import S3Resource

from llm_assets import LLMPipeline, LocalFolderSource, vLLMEngineProcessorConfig
from llm_assets.defs.factory import build_definitions
from llm_assets.resources import PartitionStorage, RayDataResource, make_resources

PIPELINES = [
    LLMPipeline(
        name="reviews",
        config=vLLMEngineProcessorConfig(model_source="Qwen/Qwen2.5-0.5B-Instruct"),
        source=LocalFolderSource("/data/reviews/landing"),
        preprocess=lambda row: {"messages": [{"role": "user", "content": row["text"]}]},
    )
]

resources = make_resources(  # {"ray_data": ..., "storage": ..., "engine_pool": ...}
    PartitionStorage(root="s3://bucket/runs", s3=S3Resource(endpoint_url="http://minio:9000")),
    RayDataResource(address="auto"),  # an existing Ray cluster; None: a local Ray per run
    max_engine_restarts=1,  # EnginePoolResource settings from here on
    price_per_gpu_hour=2.5,  # adds estimated_cost to the engine stage's metadata
)
defs = build_definitions(PIPELINES, resources=resources)
