"""A local S3-compatible server (moto's) on 127.0.0.1, standing in for a cloud bucket: the cloud
itself cannot be reached from here. Everything else is real - pyarrow's S3 filesystem, uploads,
listings, downloads - configured the way clusters are, through the standard AWS_* variables."""

from __future__ import annotations

import os
import subprocess


def start_s3_server() -> tuple[subprocess.Popen, dict]:
    from rayapp.ops.rehearse import start_local_s3

    return start_local_s3("testing")


def create_bucket(env: dict, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)


def with_env(env: dict):
    os.environ.update(env)
