from dagster_aws.s3 import S3Resource

from llm_assets import vLLMEngineProcessorConfig
from llm_assets.resources import PartitionStorage, RayDataResource, make_resources

# A model uploaded with `python -m llm_assets.upload_model`: each Ray node downloads it once.
config = vLLMEngineProcessorConfig(model_source="s3://models/qwen-7b", engine_kwargs={"max_model_len": 4096})

minio = S3Resource(endpoint_url="http://minio:9000")
storage = PartitionStorage(root="s3://bucket/runs", s3=minio)  # stage outputs on S3
resources = make_resources(
    storage,
    RayDataResource(address="auto"),  # an existing Ray cluster
    model_s3=minio,  # for s3:// models; default: each node's AWS environment
    max_engine_restarts=1,
)
