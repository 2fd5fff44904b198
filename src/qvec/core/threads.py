"""Many small torch jobs on a few cores.

torch splits each operation over its intra-op threads. For operations on a few hundred kilobytes that split costs
about what it saves, and the single-threaded parts between operations (Python, numpy, a matrix-vector product)
leave the other cores idle. Independent jobs run one per thread, each with one intra-op thread, keep every core
busy instead.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
_LOCK = threading.Lock()


@contextlib.contextmanager
def one_intraop_thread() -> Iterator[None]:
    """torch runs each operation on the calling thread within this block (its intra-op thread count is global:
    the previous count is restored on the way out)."""
    with _LOCK:
        old = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        yield
    finally:
        with _LOCK:
            torch.set_num_threads(old)


def map_threads(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]``, computed by ``workers`` threads (torch's intra-op thread count by default),
    each running torch on one intra-op thread; the first exception in ``items`` order is raised."""
    workers = torch.get_num_threads() if workers is None else workers
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with one_intraop_thread(), ThreadPoolExecutor(min(workers, len(items)), "qvec-worker") as pool:
        return list(pool.map(fn, items))
