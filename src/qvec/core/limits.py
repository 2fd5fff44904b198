"""Bounds on what a user can ask for: counts checked for their range, and sizes checked against the memory this
machine has, before anything is allocated.

A size that comes from a user (``--probe-size``, ``--calib-size``, ``--batch-size``, ``--limit``, ``--workers``,
``--threads``, a header's model options) can ask for more than any machine holds. Left alone, the allocation
fails with a traceback, or the kernel's OOM killer ends the process without a word. :func:`check_count` checks a
count's range; :func:`check_fits` compares an estimate in bytes with the memory available now
(``MemAvailable`` of ``/proc/meminfo``, else the physical memory), and refuses in one line naming the option, the
estimate and what the machine has. ``QVEC_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix) replaces the
measured figure, to lower it on a shared machine or to raise it where the estimate is too careful.
"""

from __future__ import annotations

import os
import re

from qvec.core.errors import QvecError

MEMORY_ENV = "QVEC_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_bytes(n: float) -> str:
    """``1.5 GiB``: a byte count in the largest binary unit below it."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1e4 else f"{n / size:.3e} {unit}"
    return f"{int(n)} bytes"


def available_memory() -> int:
    """Bytes this process may still allocate: ``$QVEC_MEMORY_LIMIT``, else MemAvailable, else physical memory."""
    raw = os.environ.get(MEMORY_ENV, "").strip()
    if raw:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", raw, re.IGNORECASE)
        if not m:
            raise QvecError(f"${MEMORY_ENV} must be a number of bytes, optionally with K, M, G or T, got {raw!r}")
        return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return 2**40  # unknown: nothing is refused on this ground


def check_count(value: object, name: str, minimum: int = 1, maximum: int | None = None, unit: str = "") -> int:
    """``value`` as an int in ``minimum..maximum``, else one line: ``--batch-size must be at least 1, got 0``."""
    what = f" of {unit}" if unit else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise QvecError(f"{name} must be a whole number{what}, got {value!r}")
    if value < minimum:
        raise QvecError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise QvecError(f"{name} must be at most {maximum:,}, got {value:,}")
    return value


def check_fits(nbytes: float, what: str, hint: str = "") -> None:
    """Refuse, in one line, an allocation of about ``nbytes`` that the available memory cannot hold.

    ``what`` says what would be allocated (``--probe-size 10000000000: 3 x 32 x 32 noise images``); ``hint`` how
    to ask for less."""
    have = available_memory()
    if nbytes > have:
        more = f"; {hint}" if hint else ""
        raise QvecError(f"{what} would need {human_bytes(nbytes)} of memory, more than the {human_bytes(have)} "
                        f"available (${MEMORY_ENV} overrides that figure){more}")


#: Bytes a forward pass needs per image, as a multiple of the image's float32 input (3 x S x S x 4 bytes): the
#: activations of a ViT block (MLP hidden layer, attention maps) at once; training keeps every block's for the
#: backward pass, hence the larger factor. Estimates, on the generous side: they only refuse absurd batches.
FORWARD_FACTOR = 32
TRAIN_FACTOR = 96
#: Memory one grid worker process takes (torch, a model, cached splits): refuses worker counts no machine holds.
WORKER_BYTES = 512 * 2**20


def check_batch(batch_size: object, image_size: int, name: str = "--batch-size", training: bool = False) -> int:
    """A batch size that is at least 1 and whose images and activations fit in the memory available."""
    batch = check_count(batch_size, name, 1)
    per_image = 4 * 3 * image_size * image_size * (TRAIN_FACTOR if training else FORWARD_FACTOR)
    check_fits(batch * per_image, f"{name} {batch:,}: a {'training' if training else 'forward'} batch of "
               f"{batch:,} images of {image_size}x{image_size}", f"use a smaller {name}")
    return batch


def check_workers(workers: object, name: str = "--workers") -> int:
    """A worker count in 1..4 per CPU whose processes fit in the memory available."""
    n = check_count(workers, name, 1, max_threads())
    check_fits(n * WORKER_BYTES, f"{name} {n}: {n} worker processes", f"use fewer {name}")
    return n


def max_threads() -> int:
    """The most torch threads worth asking for: 4 per CPU (more only adds contention)."""
    return 4 * (os.cpu_count() or 1)
