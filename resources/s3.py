"""S3 through dagster-aws: one ``S3Resource`` configures both boto3 (listing, small objects) and
the pyarrow filesystem that Ray Data tasks read and write Parquet with.

Credentials come from the resource when it sets them, else from the usual AWS chain (environment,
profile, instance role), for boto3 and pyarrow alike. They are never logged or put in metadata.
"""

from __future__ import annotations

from typing import Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs
from dagster_aws.s3 import S3Resource

__all__ = ["S3Resource", "pyarrow_s3", "split_s3_uri"]


def pyarrow_s3(s3: Optional[S3Resource]) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem with the same endpoint, region and credentials as ``s3``."""
    kwargs: dict = {}
    if s3 is not None:
        if s3.endpoint_url:
            endpoint = urlparse(s3.endpoint_url)
            kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
            kwargs["scheme"] = endpoint.scheme or "https"
        if s3.region_name:
            kwargs["region"] = s3.region_name
        if s3.aws_access_key_id and s3.aws_secret_access_key:
            kwargs["access_key"] = s3.aws_access_key_id
            kwargs["secret_key"] = s3.aws_secret_access_key
            if s3.aws_session_token:
                kwargs["session_token"] = s3.aws_session_token
        if s3.use_unsigned_session:
            kwargs["anonymous"] = True
    return pafs.S3FileSystem(**kwargs)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket")
    return bucket, prefix.strip("/")
