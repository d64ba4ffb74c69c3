"""The data set in a DVC remote: `push-data` and `pull-data`.

The data set is the `data` stage's output in dvc.yaml, so DVC already knows its content hash;
pushing sends that content to the remote named by `remote.url` (a local folder, or s3:// with an
optional S3-compatible endpoint). The remote is passed to DVC at run time rather than written to
.dvc/config, so params.yaml stays the one place it is set, and credentials stay in the
environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), where DVC's S3 client reads them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from blossom.config import RemoteConfig, redact
from blossom.errors import BlossomError

log = logging.getLogger(__name__)

REMOTE_NAME = "blossom"
DATA_STAGE = "data"


class StorageError(BlossomError):
    pass


def remote_settings(cfg: RemoteConfig, root: Path) -> dict:
    url = cfg.url
    if "://" not in url:  # a local folder, relative to the project
        url = str((root / url).resolve())
    elif not url.startswith(("s3://", "file://")):
        raise StorageError(f"remote.url {redact(url)!r}: use a local folder or s3://bucket/prefix")
    settings: dict = {"url": url}
    if url.startswith("s3://"):
        if cfg.endpoint:
            settings["endpointurl"] = cfg.endpoint
        if cfg.region:
            settings["region"] = cfg.region
    return settings


def _repo(cfg: RemoteConfig, root: Path):
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    config = {"core": {"remote": REMOTE_NAME}, "remote": {REMOTE_NAME: remote_settings(cfg, root)}}
    try:
        return Repo(str(root), config=config)
    except NotDvcRepoError:
        raise StorageError(f"{root} is not a DVC project: run `dvc init` there (a clone of blossom has one)") from None


def s3_hint(e: BaseException, url_key: str = "remote.url") -> str:
    """What an S3 client's error means for the user, and the fix, in a clause."""
    text = " ".join(str(e).split())
    cause = e.__cause__ or e.__context__
    while cause is not None:  # DVC and s3fs wrap the S3 client's error; its own words name the problem
        text += " " + " ".join(str(cause).split())
        cause = cause.__cause__ or cause.__context__
    low = text.lower()
    if "signaturedoesnotmatch" in low or "invalidaccesskeyid" in low or "access denied" in low or "forbidden" in low:
        return "the S3 credentials were refused: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return f"the bucket does not exist: create it, or fix {url_key}"
    if "credentials" in low:
        return "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if "connect" in low or "endpoint" in low or "timed out" in low:
        return "the S3 endpoint cannot be reached: check remote.endpoint and that the server is up"
    return text[:200]


def _explain(e: Exception, cfg: RemoteConfig) -> StorageError:
    return StorageError(f"data store {redact(cfg.url)}: {s3_hint(e)}")


def _probe(repo, cfg: RemoteConfig, pulling: bool) -> None:
    """Touch the remote once, so a refused key, a missing bucket or a dead endpoint is one clear error
    before any transfer (DVC would otherwise report only that N files failed)."""
    try:
        remote = repo.cloud.get_remote(REMOTE_NAME)
        found = remote.fs.exists(remote.path)
        bucket_missing = not found and cfg.url.startswith("s3://") and not remote.fs.exists(remote.path.split("/")[0])
    except Exception as e:
        log.debug("remote probe failed", exc_info=True)
        raise _explain(e, cfg) from None
    if bucket_missing:
        raise StorageError(f"data store {redact(cfg.url)}: the bucket does not exist: create it, or fix remote.url")
    if pulling and not found:
        raise StorageError(f"data store {redact(cfg.url)} is empty: run `blossom push-data` first, or fix remote.url")


def push_data(cfg: RemoteConfig, root: Path) -> int:
    """Push the data stage's output to the remote; returns the number of files sent."""
    from dvc.exceptions import DvcException

    repo = _repo(cfg, root)
    _probe(repo, cfg, pulling=False)
    try:
        with repo:
            sent = repo.push(targets=[DATA_STAGE])
            if sent == 0 and _out_of_date(repo):
                # DVC pushes what dvc.lock records; data written outside `dvc repro` is not that.
                raise StorageError(
                    "outputs/data is not the data set DVC recorded (written by `blossom data` "
                    "outside DVC, or changed since): run `dvc repro data` (or `dvc commit data`), "
                    "then push again"
                )
            return sent
    except DvcException as e:
        if "does not exist" in str(e) and "stage" in str(e).lower() or "is not tracked" in str(e):
            raise StorageError("the data set is not tracked yet: run `dvc repro data` first") from None
        raise _explain(e, cfg) from None
    except Exception as e:  # the S3 client's own errors (boto, aiohttp, OSError) come through DVC unwrapped
        log.debug("push failed", exc_info=True)
        raise _explain(e, cfg) from None


def _out_of_date(repo) -> bool:
    """Whether the data stage's recorded output differs from outputs/data (or was never recorded)."""
    status = repo.status(targets=[DATA_STAGE])
    return not _locked(repo) or any(
        isinstance(entry, dict) and "changed outs" in entry for entry in status.get(DATA_STAGE) or []
    )


def _locked(repo) -> bool:
    import yaml

    lock = Path(repo.root_dir) / "dvc.lock"
    try:
        return DATA_STAGE in (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return False


def pull_data(cfg: RemoteConfig, root: Path) -> int:
    """Fetch the data stage's output from the remote into outputs/; returns the number of files fetched."""
    repo = _repo(cfg, root)
    _probe(repo, cfg, pulling=True)
    try:
        with repo:
            result = repo.pull(targets=[DATA_STAGE])
    except Exception as e:  # DvcException, or the S3 client's own errors
        log.debug("pull failed", exc_info=True)
        raise _explain(e, cfg) from None
    return result["stats"]["fetched"]
