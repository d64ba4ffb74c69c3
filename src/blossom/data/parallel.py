"""Work on several processes, results in order, with a bounded amount of it in flight."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

AHEAD = 4  # tasks queued per process: enough to keep each busy, few enough that memory stays flat


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], workers: int) -> Iterator[R]:
    """fn(task) for each task, in order, on `workers` processes (in this one when workers <= 1).

    Tasks are submitted a few at a time, never all at once: a data set of millions of images keeps
    neither millions of pending tasks nor their finished results in memory when the caller
    writes them more slowly than the pool makes them. Never more processes than tasks: a
    fork-started pool starts every process it is given at once."""
    tasks = iter(tasks)
    first = list(islice(tasks, AHEAD * workers)) if workers > 1 else []
    workers = min(workers, len(first))
    if workers <= 1:
        yield from map(fn, chain(first, tasks))
        return
    pool = ProcessPoolExecutor(workers)
    try:
        pending = deque(pool.submit(fn, t) for t in first)
        while pending:
            result = pending.popleft().result()
            for t in islice(tasks, 1):
                pending.append(pool.submit(fn, t))
            yield result
    finally:
        pool.shutdown(cancel_futures=True)
