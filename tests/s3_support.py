"""A local S3-compatible server for the tests: moto's threaded server on loopback."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

KEY_ID, SECRET, REGION = "testing-key", "testing-secret", "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def client(self) -> Any:
        """A boto3 client of its own, to look at (or tamper with) the bucket behind a store's back."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
                            aws_secret_access_key=SECRET)

    def new_bucket(self) -> str:
        name = f"cotune-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, bucket: str, prefix: str = "blobs") -> dict[str, Any]:
        """The coordinator settings of an artifact store in `bucket` on this server."""
        return {"artifact_dir": f"s3://{bucket}/{prefix}", "s3_endpoint_url": self.endpoint, "s3_region": REGION,
                "s3_access_key_id": KEY_ID, "s3_secret_access_key": SECRET}


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, stopped afterwards; skips without moto[server]."""
    server_module = pytest.importorskip("moto.server", reason='needs moto[server] (pip install "cotune[dev]")')
    pytest.importorskip("boto3", reason='needs boto3 (pip install "cotune[s3]")')
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()
