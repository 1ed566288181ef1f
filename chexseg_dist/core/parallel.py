"""Process pools for CPU-bound per-image work outside Ray (mask export, threshold tuning)."""

from __future__ import annotations

import collections
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def process_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int = 32) -> Iterator[R]:
    """``map(fn, items)`` in order over a spawned process pool with at most ``window`` items in flight.

    ``Executor.map`` would submit (and hold in memory) every item up front; the window bounds memory for large
    stores. ``workers <= 1`` runs in this process. Spawned, not forked: fsspec/zarr threads are not fork-safe.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        pending: collections.deque[Future[Any]] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
