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


def imap_threads(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> Iterator[R]:
    """``fn(x)`` of each of ``items``, in order, as soon as it is ready: computed by ``workers`` threads (torch's
    intra-op thread count by default), each running torch on one intra-op thread, while the caller uses the
    results before. The first exception in ``items`` order is raised; work not started when the caller stops is
    dropped."""
    workers = torch.get_num_threads() if workers is None else workers
    if workers <= 1 or len(items) <= 1:
        yield from (fn(x) for x in items)
        return
    with one_intraop_thread(), ThreadPoolExecutor(min(workers, len(items)), "qvec-worker") as pool:
        try:
            yield from pool.map(fn, items)
        except BaseException:  # an error, or the caller stopped early (GeneratorExit)
            pool.shutdown(cancel_futures=True)
            raise


def map_threads(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]``, computed as :func:`imap_threads` does."""
    return list(imap_threads(fn, items, workers))
