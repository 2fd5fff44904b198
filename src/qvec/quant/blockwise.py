"""Running a model block by block from cached inputs, for calibrated quantizers (GPTQ).

A calibrated quantizer needs each block's inputs as the already-quantized earlier blocks make them. Running the
model from its input for every block costs a number of block forwards that grows with the square of the depth;
instead the images run once up to the first block, that block's inputs are cached, and each block, once
quantized, is run on the cache to make the next block's inputs (IST-DASLab ``opt_sequential``). That is only
valid when the blocks are numbered children of one container that the model runs one after another, each fed the
previous one's output and the same other arguments: :func:`block_chain` finds such a run and :func:`chain_holds`
checks it on one image.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


class Stop(Exception):
    """Raised by a hook once the part of a forward pass that is needed has run: the rest is not computed."""


def raise_stop(*_args) -> None:
    raise Stop


def default_cache_bytes() -> int:
    """A quarter of the machine's memory: cached block inputs beyond it go to temporary files."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class BlockCache:
    """The current block's input for every calibration batch (with the batch's other arguments to the blocks), in
    memory up to ``max_bytes`` and in temporary memory-mapped files beyond (removed by :meth:`close`), so that a
    calibration set larger than memory streams through. A block's outputs overwrite its inputs."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.in_memory = 0
        self.items: list[torch.Tensor] = []
        self.extras: list[tuple[tuple, dict]] = []
        self._on_disk: set[int] = set()
        self._dir: tempfile.TemporaryDirectory | None = None

    def __len__(self) -> int:
        return len(self.items)

    def append(self, x: torch.Tensor, extra: tuple[tuple, dict]) -> None:
        self.items.append(x)
        self.extras.append(extra)
        self._store(len(self.items) - 1, x.detach())

    def replace(self, i: int, y: torch.Tensor) -> None:
        """Batch ``i``'s input becomes ``y`` (the block's output): in place when the shape is unchanged."""
        x = self.items[i]
        if x.shape == y.shape and x.dtype == y.dtype:
            x.copy_(y)
            return
        if i not in self._on_disk:
            self.in_memory -= x.numel() * x.element_size()
        self._store(i, y.detach())

    def _store(self, i: int, x: torch.Tensor) -> None:
        nbytes = x.numel() * x.element_size()
        self._on_disk.discard(i)
        if self.in_memory + nbytes <= self.max_bytes:
            self.in_memory += nbytes
            self.items[i] = x.contiguous()
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="qvec-blocks-")
        path = os.path.join(self._dir.name, f"{len(os.listdir(self._dir.name))}.npy")
        dtype = np.dtype(str(x.dtype).removeprefix("torch."))
        self.items[i] = torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(x.shape)))
        self.items[i].copy_(x)
        self._on_disk.add(i)

    def close(self) -> None:
        self.items.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def main_output(out):
    """A block's output as the next block receives it: the tensor, or the first element of a tuple (HF layers)."""
    return out[0] if isinstance(out, tuple | list) else out


def block_chain(model: nn.Module, names: list[str]) -> list[str]:
    """The blocks from the first to the last of ``names``, blocks without targets included, when all are numbered
    children of one ``nn.Sequential`` or ``nn.ModuleList`` in increasing order; empty otherwise."""
    parsed = [name.rpartition(".") for name in names]
    parents = {parent for parent, _, _ in parsed}
    if len(parents) != 1 or not all(index.isdigit() for _, _, index in parsed):
        return []
    parent = parents.pop()
    try:
        container = model.get_submodule(parent) if parent else None
    except AttributeError:
        return []
    indices = [int(index) for _, _, index in parsed]
    if not isinstance(container, nn.Sequential | nn.ModuleList) or indices != sorted(indices) \
            or indices[-1] >= len(container):
        return []
    return [f"{parent}.{i}" for i in range(indices[0], indices[-1] + 1)]


def _same(a, b) -> bool:
    """Whether two arguments to a block are the same (tensors equal, containers element by element)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a is b or (
            a.shape == b.shape and bool(torch.equal(a, b))))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def chain_holds(model: nn.Module, chain: list[str], x: torch.Tensor) -> bool:
    """Whether, on images ``x``, each block of ``chain`` receives exactly the previous block's output and the same
    other arguments as the first: then the blocks can run one after another from cached inputs."""
    seen_in: dict[str, tuple] = {}
    seen_out: dict[str, object] = {}
    hooks = []
    for name in chain:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(
            lambda _m, args, kwargs, name=name: seen_in.__setitem__(name, (args, kwargs)), with_kwargs=True))
        hooks.append(module.register_forward_hook(lambda _m, _a, out, name=name: seen_out.__setitem__(name, out)))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    if any(name not in seen_in or name not in seen_out for name in chain):
        return False
    first_args, first_kwargs = seen_in[chain[0]]
    for prev, name in zip(chain, chain[1:], strict=False):
        args, kwargs = seen_in[name]
        if not args or main_output(seen_out[prev]) is not args[0]:
            return False
        if not _same(args[1:], first_args[1:]) or not _same(kwargs, first_kwargs):
            return False
    return True


def fill_cache(model: nn.Module, block: nn.Module, batches: Iterable[torch.Tensor], cache: BlockCache) -> int:
    """Run each batch of images up to ``block`` and cache that block's inputs; returns the number of images."""

    def catch(_m, args, kwargs):
        cache.append(args[0], (tuple(args[1:]), dict(kwargs)))
        raise Stop

    hook = block.register_forward_pre_hook(catch, with_kwargs=True)
    images = 0
    try:
        for x in batches:
            images += len(x)
            try:
                model(x)
            except Stop:
                pass
    finally:
        hook.remove()
    return images


def run_block(block: nn.Module, cache: BlockCache, i: int):
    """``block`` on the cached input of batch ``i`` (a :class:`Stop` from a hook ends it early; returns None)."""
    args, kwargs = cache.extras[i]
    try:
        return block(cache.items[i], *args, **kwargs)
    except Stop:
        return None


def advance(block: nn.Module, cache: BlockCache) -> None:
    """Replace every cached input by ``block``'s output: the next block's inputs."""
    for i in range(len(cache)):
        cache.replace(i, main_output(run_block(block, cache, i)))
