"""Helpers for the tests of the s3 storage backend against moto's server (``s3_endpoint``)."""

from __future__ import annotations

import uuid
from functools import lru_cache
from typing import Any

import boto3

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@lru_cache(maxsize=4)
def client(endpoint: str) -> Any:
    """A boto3 S3 client of the test server (one per endpoint: making one takes a second)."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def new_bucket(endpoint: str) -> str:
    """Create a fresh bucket on the test server; its name."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    client(endpoint).create_bucket(Bucket=name)
    return name


def all_objects(endpoint: str, bucket: str) -> list[str]:
    """Every object name in ``bucket`` (valid keys or not: what a leak would leave)."""
    names: list[str] = []
    for page in client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket):
        names.extend(str(o["Key"]) for o in page.get("Contents", []))
    return sorted(names)


def env(endpoint: str, bucket: str, prefix: str = "") -> dict[str, str]:
    """The DISTILLERY_ settings of the s3 backend on the test server."""
    return {
        "DISTILLERY_STORAGE_BACKEND": "s3",
        "DISTILLERY_S3_BUCKET": bucket,
        "DISTILLERY_S3_PREFIX": prefix,
        "DISTILLERY_S3_ENDPOINT_URL": endpoint,
        "DISTILLERY_S3_REGION": REGION,
        "DISTILLERY_S3_ACCESS_KEY_ID": ACCESS_KEY,
        "DISTILLERY_S3_SECRET_ACCESS_KEY": SECRET_KEY,
    }
