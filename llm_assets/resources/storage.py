"""Where stage outputs live, as a Dagster resource: a thin wrapper over ``llm_assets.storage.PartitionStore``."""

from __future__ import annotations

from typing import Optional

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from llm_assets.storage import PartitionStore


class PartitionStorage(dg.ConfigurableResource):
    """Stage outputs as Parquet, per pipeline, stage and partition, under ``root``."""

    root: str = Field(description="A local folder, or s3://bucket/prefix, for stage outputs.")
    s3: Optional[S3Resource] = Field(
        default=None, description="Endpoint, region and credentials for an s3:// root (default: the AWS environment)."
    )

    def store(self) -> PartitionStore:
        return PartitionStore(self.root, self.s3)
