"""A real S3 API server on 127.0.0.1 for the object storage tests and benchmark: moto's server mode (a package, no
network), reached through pyarrow's S3 filesystem and boto3 exactly as a MinIO or AWS endpoint would be, with
``AWS_ENDPOINT_URL`` pointing at it. Only the server is a stand-in for the cloud; everything talks real HTTP."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "vitray-test-key", "AWS_SECRET_ACCESS_KEY": "vitray-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str
    pid: int

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use the server: the standard AWS variables, nothing vitray-specific."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def create_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
        return f"s3://{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server():
    """Start ``moto.server`` on a free loopback port; stopped (by its PID) on exit."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()  # noqa: S310 - loopback
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto S3 server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield S3Server(endpoint, proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
