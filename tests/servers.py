"""Servers the tests start on 127.0.0.1 (MLflow, SeaweedFS, the web app), each in its own process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
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
