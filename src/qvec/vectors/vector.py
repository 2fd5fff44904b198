"""Quantization vectors: tau_D = theta_QAT^D - theta_FT^D over the backbone, with task-vector arithmetic.

A :class:`QuantVector` is a mapping from backbone keys to float tensors. Vectors add, subtract, negate, scale and
average like task vectors; ``apply`` patches a receiver (theta_FT^R + lam * tau), which is then quantized with
PTQ. Saved as safetensors with a metadata header (architecture, donor task, quantizer, backbone fingerprint).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from qvec import __version__
from qvec.core.checkpoint import Checkpoint, read_safetensors, save_safetensors
from qvec.core.errors import QvecError
from qvec.core.schema import (
    FORMAT_VECTOR,
    KIND_PATCHED,
    META_COVERAGE,
    META_DONOR,
    META_FINGERPRINT,
    META_FORMAT,
    META_KIND,
    META_MODEL,
    META_PARAMS,
    META_PATCH,
    META_QUANT,
    META_TASK,
    META_VERSION,
    check_header,
)
from qvec.models import ModelSpec, get_adapter
from qvec.quant.ptq import target_keys
from qvec.quant.targets import ALL_TARGETS, TargetFilter

#: Which backbone tensors a vector covers: every float tensor (the paper's, SPEC section 1), or only the weights
#: PTQ quantizes (the quantized Linear weights: biases, norms, embeddings and LayerScale are left out).
COVERAGES = ("all", "quantized")


def _check_roles(ft: Checkpoint, qat: Checkpoint) -> None:
    """The FT / QAT headers must match their roles (see :meth:`QuantVector.from_checkpoints`)."""
    if ft.path is not None and qat.path is not None and Path(ft.path).resolve() == Path(qat.path).resolve():
        raise QvecError(f"{ft.path}: given as both the FT and the QAT checkpoint; the vector would be zero")
    ft_kind, qat_kind = ft.meta.get(META_KIND), qat.meta.get(META_KIND)
    if ft_kind == "qat" and qat_kind == "ft":
        raise QvecError(f"--ft {ft.name()} is a QAT checkpoint and --qat {qat.name()} an FT one: swapped? (the "
                        "vector would be -tau)")
    if ft_kind not in (None, "ft"):
        raise QvecError(f"{ft.name()}: header says kind {ft_kind!r}; the FT checkpoint must be kind 'ft'")
    if qat_kind not in (None, "qat"):
        raise QvecError(f"{qat.name()}: header says kind {qat_kind!r}; the QAT checkpoint must be kind 'qat'")
    ft_task, qat_task = ft.meta.get(META_TASK), qat.meta.get(META_TASK)
    if ft_task and qat_task and ft_task != qat_task:
        raise QvecError(f"the FT checkpoint is of task {ft_task!r} and the QAT one of {qat_task!r}: a donor's "
                        "vector needs both of one task")


def _check_finite(key: str, t: torch.Tensor, source: str) -> None:
    if not torch.isfinite(t).all():
        bad = "NaN" if torch.isnan(t).any() else "Inf"
        raise QvecError(f"{source}: tensor {key!r} contains {bad}")


def _sum_is_finite(t: torch.Tensor) -> bool:
    """Cheap screen for NaN/Inf: they propagate into the sum (a float overflow is re-checked exactly)."""
    return t.numel() == 0 or bool(torch.isfinite(t.sum()))


def check_same_layout(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: Iterable[str], a_name: str, b_name: str
) -> None:
    """Every key in ``keys`` exists in both with equal shape and dtype; otherwise name the first offender."""
    for k in keys:
        if k not in a:
            raise QvecError(f"key {k!r} is missing from {a_name}")
        if k not in b:
            raise QvecError(f"key {k!r} is missing from {b_name}")
        if a[k].shape != b[k].shape:
            raise QvecError(f"key {k!r}: shape {tuple(a[k].shape)} in {a_name} but {tuple(b[k].shape)} in {b_name}")
        if a[k].dtype != b[k].dtype:
            raise QvecError(f"key {k!r}: dtype {a[k].dtype} in {a_name} but {b[k].dtype} in {b_name}")


def check_fingerprints(vec_fp: str | None, recv_fp: str | None, recv_name: str, allow: bool) -> None:
    if vec_fp and recv_fp and vec_fp != recv_fp and not allow:
        raise QvecError(
            f"{recv_name}: backbone fingerprint {recv_fp} differs from the vector's {vec_fp} (made for another "
            "pretrained backbone); pass --allow-fingerprint-mismatch to apply it anyway"
        )


class QuantVector:
    """A direction in weight space that makes a fine-tuned backbone robust to PTQ."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = dict(tensors)
        self.meta: dict[str, str] = dict(meta or {})

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def from_state_dicts(
        cls,
        ft: Mapping[str, torch.Tensor],
        qat: Mapping[str, torch.Tensor],
        backbone_keys: Iterable[str],
        meta: Mapping[str, str] | None = None,
        ft_name: str = "the FT checkpoint",
        qat_name: str = "the QAT checkpoint",
    ) -> QuantVector:
        """``qat - ft`` over ``backbone_keys`` (integer buffers skipped), after strict layout checks."""
        keys = [k for k in backbone_keys if ft[k].is_floating_point()] if backbone_keys else []
        extra = sorted(set(qat) - set(ft))
        if extra:
            raise QvecError(f"key {extra[0]!r} is in {qat_name} but not in {ft_name} (different architecture?)")
        missing = sorted(set(ft) - set(qat))
        if missing:
            raise QvecError(f"key {missing[0]!r} is missing from {qat_name} (different architecture?)")
        check_same_layout(ft, qat, keys, ft_name, qat_name)
        out = {}
        for k in keys:
            out[k] = qat[k].detach() - ft[k].detach()
            if not _sum_is_finite(out[k]):  # NaN/Inf in either input shows in the difference
                _check_finite(k, ft[k], ft_name)
                _check_finite(k, qat[k], qat_name)
        if not out:
            raise QvecError("no floating-point backbone tensors to take a difference over")
        return cls(out, meta)

    @classmethod
    def from_checkpoints(cls, ft: Checkpoint, qat: Checkpoint, allow_fingerprint_mismatch: bool = False,
                         check_roles: bool = True, coverage: str = "all",
                         targets: TargetFilter | bool = ALL_TARGETS) -> QuantVector:
        """The donor's vector from its FT and QAT checkpoints (both trained from the same theta_0).

        With ``check_roles`` (the default) the headers must agree with the roles: the FT file says ``ft`` and the
        QAT file ``qat`` (swapped files would give -tau), both are of one task (else the donor is mislabelled), and
        they are not the same file or the same weights (a zero vector). ``coverage`` is ``all`` (every float
        backbone tensor, the paper's) or ``quantized`` (only the weights ``targets`` selects for PTQ); it is
        recorded in the header."""
        if coverage not in COVERAGES:
            raise QvecError(f"coverage must be one of {', '.join(COVERAGES)}, got {coverage!r}")
        if check_roles:
            _check_roles(ft, qat)
        ft_spec, qat_spec = ft.model_spec, qat.model_spec
        if (ft_spec.family, ft_spec.name) != (qat_spec.family, qat_spec.name):
            raise QvecError(f"architectures differ: {ft.name()} is {ft_spec}, {qat.name()} is {qat_spec}")
        check_fingerprints(ft.fingerprint, qat.fingerprint, qat.name("the QAT checkpoint"), allow_fingerprint_mismatch)
        adapter = get_adapter(ft_spec)
        meta = {
            META_MODEL: ft.meta[META_MODEL],
            META_DONOR: ft.meta.get(META_TASK, ""),
            META_QUANT: qat.meta.get(META_QUANT, ""),
            META_COVERAGE: coverage,
        }
        if ft.fingerprint:
            meta[META_FINGERPRINT] = ft.fingerprint
        keys = adapter.backbone_keys(ft.state)
        if coverage == "quantized":
            quantized = set(target_keys(ft_spec, targets))
            keys = [k for k in keys if k in quantized]
        vec = cls.from_state_dicts(
            ft.state,
            qat.state,
            keys,
            meta,
            ft.name("the FT checkpoint"),
            qat.name("the QAT checkpoint"),
        )
        if check_roles and all(not bool(t.any()) for t in vec.tensors.values()):
            raise QvecError(f"{ft.name()} and {qat.name()} hold the same backbone weights: the vector would be zero "
                            "(pass the donor's QAT checkpoint as --qat)")
        return vec

    # ------------------------------------------------------------------------------------- arithmetic
    def _check_other(self, other: QuantVector) -> None:
        if set(self.tensors) != set(other.tensors):
            diff = sorted(set(self.tensors) ^ set(other.tensors))
            raise QvecError(f"vectors cover different keys, e.g. {diff[0]!r}")
        check_same_layout(self.tensors, other.tensors, self.tensors, "the left vector", "the right vector")
        check_fingerprints(self.fingerprint, other.fingerprint, "the right vector", False)

    def _combine_meta(self, other: QuantVector | None, op: str) -> dict[str, str]:
        meta = {k: v for k, v in self.meta.items() if k in (META_MODEL, META_FINGERPRINT, META_QUANT, META_COVERAGE)}
        if other is not None and other.meta.get(META_QUANT, "") != self.meta.get(META_QUANT, ""):
            # e.g. a 2-bit and a 3-bit vector: legitimate arithmetic, but the result is no longer one quantizer's
            meta[META_QUANT] = json.dumps({"mixed": [self.meta.get(META_QUANT, ""), other.meta.get(META_QUANT, "")]})
        donors = self.meta.get(META_DONOR, "?")
        meta[META_DONOR] = f"{op}({donors}{', ' + other.meta.get(META_DONOR, '?') if other else ''})"
        return meta

    def __add__(self, other: QuantVector | int) -> QuantVector:
        if isinstance(other, int) and other == 0:  # lets sum() work
            return self
        if not isinstance(other, QuantVector):
            return NotImplemented
        self._check_other(other)
        return QuantVector({k: v + other.tensors[k] for k, v in self.tensors.items()}, self._combine_meta(other, "add"))

    __radd__ = __add__

    def __sub__(self, other: QuantVector) -> QuantVector:
        if not isinstance(other, QuantVector):
            return NotImplemented
        self._check_other(other)
        return QuantVector({k: v - other.tensors[k] for k, v in self.tensors.items()}, self._combine_meta(other, "sub"))

    def __neg__(self) -> QuantVector:
        return QuantVector({k: -v for k, v in self.tensors.items()}, self._combine_meta(None, "neg"))

    def __mul__(self, scalar: float) -> QuantVector:
        if not isinstance(scalar, int | float):
            return NotImplemented
        return QuantVector({k: v * scalar for k, v in self.tensors.items()}, self._combine_meta(None, f"{scalar}*"))

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> QuantVector:
        return self * (1.0 / scalar)

    @staticmethod
    def mean(vectors: Iterable[QuantVector]) -> QuantVector:
        """The average of several donors' vectors (a multi-donor patch)."""
        vs = list(vectors)
        if not vs:
            raise QvecError("mean of zero vectors")
        total = sum(vs[1:], vs[0]) * (1.0 / len(vs))
        total.meta[META_DONOR] = "mean(" + ", ".join(v.meta.get(META_DONOR, "?") for v in vs) + ")"
        return total

    # ----------------------------------------------------------------------------------------- patching
    def check_applicable(self, backbone: Mapping[str, torch.Tensor], receiver_name: str = "the receiver",
                         lam: float = 1.0) -> None:
        """``lam`` is finite and every tensor of the vector is a tensor of ``backbone`` with the same shape."""
        if not math.isfinite(lam) or abs(lam) > torch.finfo(torch.float32).max:
            raise QvecError(f"lambda must be finite and within float32 range, got {lam}")
        for k, t in self.tensors.items():
            if k not in backbone:
                raise QvecError(f"vector {self.meta.get(META_DONOR, '')!r}: tensor {k!r} is not a backbone tensor of "
                                f"{receiver_name}")
            if tuple(t.shape) != tuple(backbone[k].shape):
                raise QvecError(f"vector {self.meta.get(META_DONOR, '')!r}: {k!r} has shape {tuple(t.shape)} but "
                                f"{receiver_name} has {tuple(backbone[k].shape)}")

    @property
    def coverage(self) -> str:
        """``all`` or ``quantized`` (see :data:`COVERAGES`); vectors from before the option cover ``all``."""
        return self.meta.get(META_COVERAGE, "all")

    def apply_to_state(
        self,
        receiver: Mapping[str, torch.Tensor],
        lam: float = 1.0,
        receiver_name: str = "the receiver",
        receiver_fingerprint: str | None = None,
        allow_fingerprint_mismatch: bool = False,
        inplace: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``receiver + lam * self``; keys outside the vector (the head) are kept as they are.

        With ``inplace`` the receiver's tensors are updated in place (no new memory: the fast path for grids that
        load a receiver once per patch); otherwise a new state dict is returned and the receiver is untouched.
        """
        if not math.isfinite(lam) or abs(lam) > torch.finfo(torch.float32).max:
            raise QvecError(f"lambda must be finite and within float32 range, got {lam}")
        check_fingerprints(self.fingerprint, receiver_fingerprint, receiver_name, allow_fingerprint_mismatch)
        check_same_layout(receiver, self.tensors, self.tensors, receiver_name, "the vector")
        out = dict(receiver) if inplace else {}
        for k, t in receiver.items():
            if k not in self.tensors:
                out[k] = t if inplace else t.clone()
                continue
            if inplace:
                out[k] = t.add_(self.tensors[k], alpha=lam)
            else:
                out[k] = torch.add(t, self.tensors[k], alpha=lam)
            if not _sum_is_finite(out[k]):  # one reduction instead of a full isfinite mask per tensor
                _check_finite(k, t, receiver_name)
                _check_finite(k, self.tensors[k], "the vector")
                if not bool(torch.isfinite(out[k]).all()):
                    raise QvecError(f"lambda {lam:g} overflows tensor {k!r} (receiver + lambda * vector is not "
                                    "finite)")
        return out

    def apply(
        self, receiver: Checkpoint, lam: float = 1.0, allow_fingerprint_mismatch: bool = False, inplace: bool = False
    ) -> Checkpoint:
        """Patch a receiver checkpoint: theta_FT^R + lam * tau. The receiver keeps its own head.

        ``inplace`` reuses the receiver's tensors (the receiver checkpoint then holds the patched weights).
        """
        rspec = receiver.model_spec if META_MODEL in receiver.meta else None
        vspec = self.model_spec
        if rspec is not None and vspec is not None and (rspec.family, rspec.name) != (vspec.family, vspec.name):
            raise QvecError(f"{receiver.name('the receiver')} is {rspec}, but the vector was made for {vspec}")
        if vspec is not None and self.coverage == "all":  # a vector over every float tensor: nothing may be left
            adapter = get_adapter(vspec)
            extra = [k for k, v in receiver.state.items()
                     if k not in self.tensors and v.is_floating_point() and not adapter.is_head(k)]
            if extra:
                raise QvecError(f"{receiver.name('the receiver')}: unexpected key {extra[0]!r} (not in the vector's "
                                f"backbone or a head; {len(extra)} extra in all)")
        state = self.apply_to_state(
            receiver.state,
            lam,
            receiver.name("the receiver"),
            receiver.fingerprint,
            allow_fingerprint_mismatch,
            inplace,
        )
        meta = dict(receiver.meta)
        meta[META_KIND] = KIND_PATCHED
        meta[META_PATCH] = json.dumps({"donor": self.meta.get(META_DONOR, ""), "lambda": lam})
        return Checkpoint(state, meta)

    # ------------------------------------------------------------------------------------------ analysis
    @property
    def fingerprint(self) -> str | None:
        return self.meta.get(META_FINGERPRINT) or None

    @property
    def model_spec(self):
        raw = self.meta.get(META_MODEL)
        return ModelSpec.from_json(raw) if raw else None

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def norm(self) -> float:
        """Global L2 norm over every tensor."""
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.tensors.values()))

    def norms(self) -> dict[str, float]:
        """L2 norm per tensor."""
        return {k: float(t.double().norm()) for k, t in self.tensors.items()}

    def dot(self, other: QuantVector) -> float:
        self._check_other(other)
        return sum(float((v.double() * other.tensors[k].double()).sum()) for k, v in self.tensors.items())

    def cosine(self, other: QuantVector) -> float:
        """Cosine similarity of the two flattened vectors (H = I in SPEC section 8)."""
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom else 0.0

    def cosine_per_tensor(self, other: QuantVector) -> dict[str, float]:
        self._check_other(other)
        out = {}
        for k, v in self.tensors.items():
            a, b = v.double().flatten(), other.tensors[k].double().flatten()
            d = float(a.norm() * b.norm())
            out[k] = float(a @ b) / d if d else 0.0
        return out

    # --------------------------------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike) -> Path:
        meta = dict(self.meta)
        meta.update({META_FORMAT: FORMAT_VECTOR, META_PARAMS: str(self.num_params), META_VERSION: __version__})
        save_safetensors(path, self.tensors, meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantVector:
        tensors, meta = read_safetensors(path)
        meta = check_header(meta, path)
        if meta.get(META_FORMAT) != FORMAT_VECTOR:
            raise QvecError(f"{path}: not a qvec quantization vector (format {meta.get(META_FORMAT, 'unknown')!r})")
        vec = cls(tensors, meta)
        if META_PARAMS in meta and meta[META_PARAMS] != str(vec.num_params):
            raise QvecError(f"{path}: header says {META_PARAMS} = {meta[META_PARAMS]} but its tensors hold "
                            f"{vec.num_params} values (edited or damaged file)")
        for k, t in tensors.items():
            if not _sum_is_finite(t):
                _check_finite(k, t, str(path))
        return vec

    def __repr__(self) -> str:
        return (
            f"QuantVector(donor={self.meta.get(META_DONOR, '?')!r}, tensors={len(self.tensors)}, "
            f"params={self.num_params}, norm={self.norm():.4g})"
        )
