"""push-data / pull-data against a local-folder remote and a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servers import KEY, SECRET
from test_dvc import micro_project, repro


def blossom(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blossom.cli", *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def data_project(tmp_path_factory):
    """A micro project whose `data` stage has run, so DVC tracks the data set."""
    root = micro_project(tmp_path_factory.mktemp("store") / "proj")
    ran, _, _ = repro(root, "data")
    assert ran == ["data"]
    return root


def push_delete_pull(root: Path, sets: list[str], env: dict | None = None) -> None:
    before = tree_digest(root / "outputs" / "data")
    pushed = blossom(root, *sets, "push-data", env=env)
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    assert f"{len(before) + 1} file(s) sent" in pushed.stdout  # every file, and DVC's manifest of the folder
    shutil.rmtree(root / "outputs" / "data")
    shutil.rmtree(root / ".dvc" / "cache")  # nothing local left to restore from
    pulled = blossom(root, *sets, "pull-data", env=env)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert tree_digest(root / "outputs" / "data") == before


@pytest.mark.slow
def test_local_folder_remote_round_trip(data_project, tmp_path):
    push_delete_pull(data_project, ["--set", f"remote.url={tmp_path / 'remote'}"])
    assert any((tmp_path / "remote" / "files" / "md5").iterdir())


@pytest.mark.slow
def test_s3_remote_round_trip_and_clear_errors(data_project, s3_server):
    sets = [
        "--set",
        "remote.url=s3://blossom/flowers",
        "--set",
        f"remote.endpoint={s3_server}",
        "--set",
        "remote.region=us-east-1",
    ]
    creds = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    push_delete_pull(data_project, sets, creds)

    wrong = blossom(data_project, *sets, "push-data", env={**creds, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1] == (
        "blossom: error: data store s3://blossom/flowers: the S3 credentials were refused: "
        "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )
    assert "not-the-secret" not in wrong.stderr and "Traceback" not in wrong.stderr

    missing = blossom(data_project, "--set", "remote.url=s3://no-such-bucket/x", *sets[2:], "pull-data", env=creds)
    assert missing.returncode == 2 and "the bucket does not exist" in missing.stderr
    assert (data_project / "outputs" / "data" / "train" / "metadata.jsonl").exists()  # a failed pull keeps the data

    in_url = blossom(data_project, "--set", f"remote.url=s3://{KEY}:{SECRET}@blossom/x", "push-data", env=creds)
    assert in_url.returncode == 2 and "remote.url holds a password" in in_url.stderr
    assert SECRET not in in_url.stderr
