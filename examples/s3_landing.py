from dagster_aws.s3 import S3Resource

from llm_assets import S3PrefixSource

s3 = S3Resource(endpoint_url="http://minio:9000", region_name="us-east-1")  # credentials: fields or the AWS environment
source = S3PrefixSource("landing-bucket", prefix="reviews/", pattern="*.jsonl", s3=s3)
