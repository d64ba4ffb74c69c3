"""Atomic writes: anything a reader could see half-written goes to a temp file and is renamed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from blossom.errors import DataError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Temp folders of `path` left by killed runs (their process is gone), removed; returns them.
    A run killed between its two renames left the previous result as .NAME.old: it is put back."""
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    stale = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if tmp.is_dir() and parts[0].isdigit() and not _alive(int(parts[0])):
            shutil.rmtree(tmp, ignore_errors=True)
            stale.append(tmp)
    return stale


def unfinished(path: Path) -> bool:
    """Whether `path` is an atomic_dir temp folder (a build that never finished), not a result."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name (holding this process's id), then swap it in whole:
    readers never see a partial one, and the next build removes the temps of killed runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(built: Path, path: Path) -> None:
    """Replace the folder `path` by the finished folder `built` (two renames; a kill between them
    leaves the previous result as .NAME.old, which remove_stale_temps puts back)."""
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(built, path)
    shutil.rmtree(old, ignore_errors=True)


def inside(root: Path, name: object, where: str) -> Path:
    """root/name, refused unless it is a relative path that stays inside root once `..` and symlinks
    are resolved: a data set never reads or writes outside the folder it was given."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or "\x00" in name:
        raise DataError(f"{where}: file_name {name!r} must be a relative path inside {root}: fix or remove the row")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise DataError(
            f"{where}: file_name {name!r} leads outside {root} (through '..' or a symlink): "
            "file names must stay inside the folder; fix or remove the row"
        )
    return path
