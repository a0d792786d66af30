"""S3 settings for pyarrow: one dagster-aws ``S3Resource`` (or any object with its fields:
``endpoint_url``, ``region_name``, the keys) configures both boto3 (listing, small objects) and the
pyarrow filesystem that Ray tasks read and write Parquet with. Imports no Dagster.

Credentials come from the resource when it sets them, else from the usual AWS chain (environment,
profile, instance role), for boto3 and pyarrow alike. They are never logged or put in metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = ["S3Access", "pyarrow_s3", "split_s3_uri"]


def pyarrow_s3(s3: Optional[Any]) -> pafs.S3FileSystem:
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


@dataclass(frozen=True)
class S3Access:
    """Endpoint, region and credentials for boto3; None fields: the node's AWS configuration."""

    endpoint_url: Optional[str] = None
    region_name: Optional[str] = None
    access_key_id: Optional[str] = field(default=None, repr=False)
    secret_access_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    unsigned: bool = False

    @classmethod
    def of(cls, s3: Any) -> "S3Access":
        """From a dagster-aws ``S3Resource`` (or None: the AWS configuration of each node)."""
        if s3 is None:
            return cls()
        return cls(
            s3.endpoint_url,
            s3.region_name,
            s3.aws_access_key_id,
            s3.aws_secret_access_key,
            s3.aws_session_token,
            bool(s3.use_unsigned_session),
        )

    def client(self):
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        kwargs = {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region_name,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            "aws_session_token": self.session_token,
        }
        config = Config(signature_version=UNSIGNED) if self.unsigned else None
        return boto3.client("s3", config=config, **{k: v for k, v in kwargs.items() if v})
