"""GPTQ (Frantar et al., 2023): calibrated weight-only PTQ on the same integer grid as RTN.

Each target weight W (out x in) is quantized column by column; the rounding error of a column is spread over the
columns not yet quantized through the inverse of the layer Hessian H = 2 X^T X / N of its calibration inputs X,
as in the published algorithm: damping of H by ``damp`` x mean(diag H), columns in order of decreasing diag(H)
(``act_order``), and lazy batch updates over blocks of ``block_size`` columns. The scales and zero points are
RTN's, computed from the original weight (for groups: static groups in the original column order), so the codes
stay on RTN's grid and ``pack`` stores them in the same packed format. The Hessian is summed in
``hessian_dtype`` (float32, as in the reference code), factorized in float64, and the column loop runs in float32.

Targets are processed in depth order, block by block (targets that share a numbered module such as ``blocks.3``),
and later blocks see the already-quantized earlier ones, as in the reference code (IST-DASLab ``opt_sequential``):
the calibration images run through the model once, each block's inputs are cached, the block's targets are
quantized from the Hessians of those inputs, and the quantized block is run once to make the next block's inputs.
The layers of one block are all calibrated on the block's float inputs (the reference's default, not AutoGPTQ's
``true_sequential``). The block-by-block running is :mod:`qvec.quant.blockwise`.

Written here rather than taken from torchao: torchao's GPTQ (``Int4WeightOnlyGPTQQuantizer``) is tied to its
int4 tinygemm layout (4 bits, asymmetric groups, bf16, CUDA kernels), not to a 2-8-bit symmetric per-channel grid.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy.linalg import blas, lapack
from torch import nn

from qvec.core.errors import QvecError
from qvec.quant.base import QParams, QuantizerConfig, register_quantizer
from qvec.quant.blockwise import (
    BlockCache,
    Stop,
    advance,
    block_chain,
    chain_holds,
    default_cache_bytes,
    fill_cache,
    raise_stop,
    run_block,
)
from qvec.quant.calibration import MIN_CALIBRATION_IMAGES, check_calibration
from qvec.quant.grid import QuantSpec, compute_qparams, grouped_view
from qvec.quant.targets import Target

#: The dtypes the Hessian products and their sum can be computed in (``GPTQConfig.hessian_dtype``).
HESSIAN_DTYPES = ("float32", "float64")


@register_quantizer
@dataclass(frozen=True)
class GPTQConfig(QuantizerConfig):
    """GPTQ on the integer grid ``grid`` (RTN's scales, the codes chosen with the layer Hessian)."""

    method: ClassVar[str] = "gptq"
    label: ClassVar[str] = "GPTQ"
    needs_calibration: ClassVar[bool] = True

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    #: float32, as in the reference code; float64 doubles the cost of the products (docs/deploy.md compares the
    #: two on fine-tuned models).
    hessian_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise QvecError(f"GPTQ damp must be in (0, 1), got {self.damp!r}")
        if self.block_size < 1:
            raise QvecError(f"GPTQ block_size must be positive, got {self.block_size!r}")
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise QvecError(f"GPTQ hessian_dtype must be one of {', '.join(HESSIAN_DTYPES)}, "
                            f"got {self.hessian_dtype!r}")

    def quantize_model_(self, model: nn.Module, targets: Sequence[Target],
                        calibration: torch.Tensor | None) -> dict[str, QParams]:
        return gptq_quantize_(model, self, targets, calibration)


def _columns(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN's scales (and zeros) of ``w`` expanded to one value per weight element (out x in)."""
    scale, zero = compute_qparams(w, spec)
    g = grouped_view(w, spec)
    full = scale.expand_as(g).reshape(w.shape)
    return full, (zero.expand_as(g).reshape(w.shape) if zero is not None else None)


def _block_of(key: str) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.3``: targets of one block share a calibration pass."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return key


#: Bytes of inputs a :class:`_Hessian` holds before it adds their products: the products of a whole calibration
#: pass are computed together, after the pass, rather than one batch at a time between the layers' forwards.
_PENDING_BYTES = 1 << 29


class _Hessian:
    """H = 2 X^T X / N of a module's inputs, collected by a forward pre-hook (:meth:`add` once the pass is over):
    the inputs are held (up to :data:`_PENDING_BYTES`), then each one's X^T X is added in ``dtype`` by BLAS
    ``syrk``, which computes only the upper triangle (X^T X is symmetric: half the products of a matrix
    product), mirrored once at the end and returned in float64 (the factorization's dtype). Holding the inputs
    keeps torch's and SciPy's BLAS threads from taking turns after every batch, where each would wait for the
    other's threads to let go of the cores. On the CPU, whatever device the model runs on."""

    def __init__(self, cols: int, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.sum = np.zeros((cols, cols), dtype=np.float64 if dtype == torch.float64 else np.float32, order="F")
        self._syrk = blas.dsyrk if dtype == torch.float64 else blas.ssyrk
        self.pending: list[np.ndarray] = []
        self.pending_bytes = 0
        self.n = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            x = x.transpose(0, 1)
        x = x.reshape(-1, x.shape[-1]).to("cpu", self.dtype, copy=True, memory_format=torch.contiguous_format)
        self.n += x.shape[0]
        self.pending.append(x.numpy())
        self.pending_bytes += x.numel() * x.element_size()
        if self.pending_bytes > _PENDING_BYTES:
            self.add()

    def add(self) -> None:
        """Add the products of the inputs held so far."""
        for x in self.pending:  # x^T, Fortran-ordered without a copy: C += x^T (x^T)^T, upper triangle only
            self.sum = self._syrk(1.0, x.T, beta=1.0, c=self.sum, trans=0, lower=0, overwrite_c=1)
        self.pending, self.pending_bytes = [], 0

    @property
    def h(self) -> torch.Tensor:
        self.add()
        upper = torch.from_numpy(self.sum)  # syrk leaves the lower triangle at zero
        h = upper + upper.T
        h.diagonal().mul_(0.5)  # exact: the diagonal was doubled
        return h.double().mul_(2.0 / max(1, self.n))


@dataclass
class _Prepared:
    """One weight ready for GPTQ's column loop: permuted (act_order), with RTN's per-element scales and zeros and
    the upper Cholesky factor of its damped inverse Hessian (float32)."""

    shape: torch.Size
    dtype: torch.dtype
    W: torch.Tensor
    Hinv: torch.Tensor
    S: torch.Tensor
    Z: torch.Tensor | None
    perm: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def _inverse_factor_of_reversed(r: torch.Tensor) -> torch.Tensor | None:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), float32, from ``r`` = J H J (H with its rows and columns
    reversed); None when H is not positive definite. With J H J = L L^T, U = J L^-1 J: one Cholesky and one
    triangular inverse (LAPACK ``trtri``), half the work of the published Cholesky, ``cholesky_inverse`` and
    second Cholesky, for the same factor."""
    L, info = torch.linalg.cholesky_ex(r)
    if info.item() != 0:
        return None
    inverse, info = lapack.dtrtri(L.numpy(), lower=1, overwrite_c=1)
    return torch.from_numpy(inverse).flip(0, 1).float() if info == 0 else None


@torch.no_grad()
def _prepare(w: torch.Tensor, h: torch.Tensor, config: GPTQConfig) -> _Prepared:
    """The factorization of GPTQ of one weight: one large LAPACK job, which uses all of torch's threads."""
    spec = config.grid
    w0 = w.detach().float().cpu().reshape(w.shape[0], -1)
    scale, zero = compute_qparams(w0, spec)
    s_full, z_full = _columns(w0, spec)
    diag = torch.diag(h).double()
    dead = diag == 0  # inputs that are always zero: their columns are zeroed, their Hessian diagonal set to 1
    diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True) if config.act_order else torch.arange(len(diag))
    W = w0[:, perm]  # a copy
    W[:, dead[perm]] = 0.0
    S = s_full[:, perm]
    Z = z_full[:, perm] if z_full is not None else None
    rev = perm.flip(0)
    H = h.double()[rev[:, None], rev]  # a copy, permuted, then reversed: its factor gives Hinv's at once
    H.diagonal()[dead[rev]] = 1.0
    damp = config.damp * torch.diag(H).flip(0).mean()  # summed in the permuted order, as published
    for attempt in range(4):  # damped in place: damp, then 10x, 100x, 1000x damp
        H.diagonal().add_(damp * (10**attempt - (10 ** (attempt - 1) if attempt else 0)))
        Hinv = _inverse_factor_of_reversed(H)
        if Hinv is not None:
            break
    else:
        raise QvecError("GPTQ: the layer Hessian is not positive definite even with 1000x damping")
    return _Prepared(w.shape, w.dtype, W, Hinv, S, Z, perm, scale, zero)


@torch.no_grad()
def _solve(p: _Prepared, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ's column loop: each column rounded, its error spread over the columns not yet quantized (lazy batch
    updates over blocks of ``block_size`` columns). Thousands of small operations on one column each, done in
    NumPy on transposed blocks (a column is a contiguous row; NumPy's per-call cost is a fraction of torch's) and
    into work buffers allocated once; the same IEEE float32 operations, in the same order, as the published loop,
    so the codes are the same."""
    W, Hinv = p.W.numpy(), p.Hinv.numpy()
    S = p.S.T.contiguous().numpy()
    Z = p.Z.T.contiguous().numpy() if p.Z is not None else None
    rows, cols = W.shape
    QT = np.empty((cols, rows), np.float32)
    lo, hi = float(config.grid.qmin), float(config.grid.qmax)
    B = config.block_size
    q, outer = np.empty(rows, np.float32), np.empty((B, rows), np.float32)
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        WT = np.ascontiguousarray(W[:, i1:i2].T)
        ET = np.empty_like(WT)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s = WT[i], S[i1 + i]
            np.divide(col, s, out=q)
            np.rint(q, out=q)
            if Z is not None:
                q += Z[i1 + i]
            np.clip(q, lo, hi, out=q)
            if Z is not None:
                q -= Z[i1 + i]
            q *= s
            QT[i1 + i] = q
            err = np.subtract(col, q, out=ET[i])
            err /= Hb[i, i]
            rest = outer[: i2 - i1 - i - 1]
            np.multiply(Hb[i, i + 1 :, None], err, out=rest)
            np.subtract(WT[i + 1 :], rest, out=WT[i + 1 :])
        if i2 < cols:
            p.W[:, i2:] -= torch.from_numpy(np.ascontiguousarray(ET.T)) @ p.Hinv[i1:i2, i2:]
    Q = torch.from_numpy(QT).T[:, torch.argsort(p.perm)]
    return Q.reshape(p.shape).to(p.dtype), p.scale, p.zero


def gptq_weight(w: torch.Tensor, h: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor | None]:
    """GPTQ of one 2-D weight given its Hessian; returns (quantized weight, RTN scales, zeros) on RTN's grid."""
    return _solve(_prepare(w, h, config), config)


def _collect(members: Sequence[Target], run: Callable[[], None], config: GPTQConfig) -> dict[str, _Hessian]:
    """Hessians of ``members`` over the calibration passes that ``run`` makes."""
    hess, hooks = {}, []
    dtype = getattr(torch, config.hessian_dtype)
    for t in members:
        hess[t.key] = _Hessian(t.weight.reshape(t.weight.shape[0], -1).shape[1], dtype)
        hooks.append(t.module.register_forward_pre_hook(hess[t.key]))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    for h in hess.values():
        h.add()
    return hess


def _quantize_members(members: Sequence[Target], hess: dict[str, _Hessian], config: GPTQConfig,
                      qparams: dict[str, tuple]) -> None:
    """Solve a block's targets one after another. The column loops are bound by the interpreter, so running two at
    once gains nothing (docs/deploy.md)."""
    for t in members:
        q, scale, zero = gptq_weight(t.weight, hess[t.key].h, config)
        t.weight.copy_(q)
        qparams[t.key] = (scale, zero)


def _from_images(model: nn.Module, members: Sequence[Target], batches: Callable[[], Iterable[torch.Tensor]],
                 config: GPTQConfig, qparams: dict[str, tuple]) -> None:
    """GPTQ of targets outside the chain of blocks: Hessians from passes of the whole model over the images (each
    pass stopped after the targets' block), then the solve."""
    try:
        block = model.get_submodule(_block_of(members[0].key))
    except AttributeError:
        block = None

    def run() -> None:
        stop = block.register_forward_hook(raise_stop) if block is not None else None
        try:
            for x in batches():
                try:
                    model(x)
                except Stop:
                    pass
        finally:
            if stop is not None:
                stop.remove()

    _quantize_members(members, _collect(members, run, config), config, qparams)


@contextlib.contextmanager
def _call_order(targets: Sequence[Target]) -> Iterator[list[str]]:
    """The targets' keys in the order the model calls their modules inside the ``with``, once per call."""
    calls: list[str] = []
    hooks = [t.module.register_forward_pre_hook(lambda *_, k=t.key: calls.append(k)) for t in targets]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def _block_hessians(block: nn.Module, members: Sequence[Target], cache: BlockCache, config: GPTQConfig,
                    calls: Sequence[str]) -> dict[str, _Hessian]:
    """The Hessians of a block's targets from its cached inputs. When each target runs once (``calls``, in the
    order of :func:`_call_order`), every batch stops just before the last one's product: its input is all that
    is needed, so the block's last layer is never computed."""
    modules = {t.key: t.module for t in members}
    ours = [k for k in calls if k in modules]
    last = modules[ours[-1]] if sorted(ours) == sorted(modules) else None

    def run() -> None:
        # registered after the Hessian hooks, so the last target's Hessian still sees its input
        stop = last.register_forward_pre_hook(raise_stop) if last is not None else None
        try:
            for i in range(len(cache)):
                run_block(block, cache, i)
        finally:
            if stop is not None:
                stop.remove()

    return _collect(members, run, config)


def _batches(calibration: torch.Tensor | Iterable[torch.Tensor], batch_size: int, label: str
             ) -> Iterator[torch.Tensor]:
    """Calibration batches: slices of a tensor, or the batches of an iterable as they come (each checked)."""
    if calibration is None or isinstance(calibration, torch.Tensor):
        x = check_calibration(calibration, label=label)
        yield from (x[s : s + batch_size] for s in range(0, len(x), batch_size))
        return
    for batch in calibration:
        yield check_calibration(batch, label=label, min_images=1)


def _find_chain(model: nn.Module, names: list[str], image: torch.Tensor) -> tuple[list[str], list[str]]:
    """The chain of blocks (:func:`block_chain`, checked on ``image``) spanning the longest run of consecutive
    target groups that are numbered blocks, and that run of group names; empty when there is none."""
    chain_like = [bool(block_chain(model, [n])) for n in names]
    if not any(chain_like):
        return [], []
    first = end = chain_like.index(True)
    while end < len(names) and chain_like[end]:
        end += 1
    span = names[first:end]
    chain = block_chain(model, span)
    return (chain, span) if chain and chain_holds(model, chain, image) else ([], [])


@torch.no_grad()
def gptq_quantize_(model: nn.Module, config: GPTQConfig, targets: Sequence[Target],
                   calibration: torch.Tensor | Iterable[torch.Tensor] | None = None, batch_size: int = 32,
                   max_cache_bytes: int | None = None) -> dict[str, tuple]:
    """GPTQ of every target in place, block by block in depth order; returns each target's (scale, zero).

    ``calibration`` is a tensor of images or an iterable of image batches (read once when all targets lie in a
    chain of blocks). Blocks that the model runs one after another (:mod:`qvec.quant.blockwise`: timm's
    ``blocks``, OpenCLIP's ``resblocks``, HF's ``layer``) are calibrated in one pass over cached block inputs (in
    memory up to ``max_cache_bytes``, by default a quarter of the machine's memory, in temporary files beyond).
    Targets outside such a chain are calibrated by passes of the whole model, which need the images as a tensor."""
    label = config.label
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(_block_of(t.key), []).append(t)
    batches = _batches(calibration, batch_size, label)
    first = next(batches, None)
    if not groups or first is None:
        check_calibration(None if first is None else first, label=label, min_images=1)
        return {}
    qparams: dict[str, tuple] = {}
    names = list(groups)
    was = model.training
    model.eval()
    cache = BlockCache(default_cache_bytes() if max_cache_bytes is None else max_cache_bytes)
    try:
        with _call_order(targets) as calls:  # the chain is checked by running the model on one image
            chain, span = _find_chain(model, names, first[:1])
        outside = [n for n in names if n not in span]
        if outside and not isinstance(calibration, torch.Tensor):
            raise QvecError(f"{label}: target block {outside[0]} lies outside the model's chain of blocks and needs "
                            "the calibration images more than once; pass them as one tensor")

        def again() -> Iterator[torch.Tensor]:
            return _batches(calibration, batch_size, label)

        for n in names[: names.index(span[0])] if span else names:
            _from_images(model, groups[n], again, config, qparams)
        if chain:
            images = fill_cache(model, model.get_submodule(chain[0]), itertools.chain([first], batches), cache)
            if images < MIN_CALIBRATION_IMAGES:
                raise QvecError(f"{label} needs at least {MIN_CALIBRATION_IMAGES} calibration images, got {images}")
            for name in chain:
                block = model.get_submodule(name)
                if name in groups:
                    hess = _block_hessians(block, groups[name], cache, config, calls)
                    _quantize_members(groups[name], hess, config, qparams)
                if name != chain[-1]:  # the last block's outputs feed no block that is still to be quantized
                    advance(block, cache)
            for n in names[names.index(span[-1]) + 1 :]:
                _from_images(model, groups[n], again, config, qparams)
    finally:
        cache.close()
        model.train(was)
    return qparams
