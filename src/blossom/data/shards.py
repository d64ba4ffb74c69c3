"""One cache shard on disk: a safetensors file written by safetensors, read back through numpy
memory maps.

safetensors' own readers hand out whole tensors or contiguous slices; training gathers random rows,
so the reader maps each tensor's bytes (the file is an 8-byte header length, a JSON header with
each tensor's dtype, shape and byte range, then the raw little-endian data) and indexes the map:
only the pages of the rows asked for are read, and nothing stays resident that the kernel cannot
drop.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from blossom.errors import DataError
from blossom.fsutil import atomic_path

DTYPES = {"I8": np.int8, "F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64}
MAX_HEADER = 1 << 20  # a shard's header lists a handful of tensors; more is a damaged file
FIX = "rerun `blossom cache` to rebuild the cache"


def write_shard(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> int:
    """Write atomically (a killed build leaves no half shard under the final name); returns bytes."""
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path.stat().st_size


def read_header(path: Path) -> tuple[dict, int]:
    """(header, data offset); a missing, truncated or foreign file is a one-line DataError."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= MAX_HEADER:
                raise DataError(f"cache shard {path} is not a safetensors file: {FIX}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise DataError(f"cache shard {path} is missing: {FIX}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"cache shard {path} has a damaged header: {FIX}") from None
    return header, 8 + n


def map_shard(path: Path, size: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read-only memory maps of the shard's tensors, and its metadata. size: the byte count the
    cache index recorded, so a truncated or swapped file is refused before a read past its end."""
    header, offset = read_header(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DataError(
            f"cache shard {path} holds {actual} bytes, the index says {size} (truncated or replaced): {FIX}"
        )
    meta = header.pop("__metadata__", None) or {}
    arrays = {}
    for name, spec in header.items():
        start, end = spec["data_offsets"]
        if spec["dtype"] not in DTYPES or offset + end > actual:
            raise DataError(f"cache shard {path} is damaged ({name}): {FIX}")
        shape = tuple(spec["shape"])
        if end == start:
            arrays[name] = np.zeros(shape, DTYPES[spec["dtype"]])
        else:
            arrays[name] = np.memmap(path, DTYPES[spec["dtype"]], "r", offset + start, shape)
    return arrays, meta
