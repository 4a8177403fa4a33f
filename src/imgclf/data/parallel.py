"""Ordered, bounded parallel map: decode images in threads, in order.

Pillow releases the GIL while decoding and resizing, so threads keep both
cores busy. At most ``prefetch`` results are in flight, so memory stays flat
however many images there are.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int | None = None, prefetch: int = 64
) -> Iterator[R]:
    """``map(fn, items)`` run in ``workers`` threads, yielding results in order."""
    workers = workers or default_workers()
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="imgclf-decode") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
