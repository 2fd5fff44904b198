"""Signals: what a candidate model (receiver + lambda * tau, quantized) is scored on, one registry.

A signal measures the candidate in the :class:`qvec.vectors.measure.Bench` and returns one value per *measure*:

* ``val`` / ``test``: top-1 on the receiver's labelled split (``val`` chooses lambda*, SPEC section 7; ``test``
  is what every published number is);
* ``probe``: the candidate against the receiver's full-precision FT model on generic unlabeled images
  (``kl``: mean KL(FT || candidate) in nats per image, ``agree``: top-1 agreement);
* ``unlabeled``: the same on the receiver's own unlabeled inputs; ``noise``: the same on uniform noise;
* ``weight``: no images: how far the quantized weights are from FT's, relative to plain PTQ of FT (``err``).

A new signal is one file: a subclass of :class:`Signal` decorated with :func:`register_signal` (a lambda rule then
reads it as ``NAME.MEASURE``; docs/extending.md). Signals carry their source (which images, how many), so that
the grid can key their results by content.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from qvec.core.errors import QvecError
from qvec.core.registry import Registry
from qvec.data.probe import NOISE, ProbeSet, load_probe, noise_probe, receiver_probe


class Bench(Protocol):
    """What a signal may read from the bench it scores (:class:`qvec.vectors.measure.Bench` is the one qvec has):
    the receiver's data config and FT state, its task, the candidate's log-probabilities, top-1 and weights."""

    config: Any
    ft: Any

    def evaluate(self, split: str, limit: int | None = None) -> Any: ...

    def log_probs(self, x: torch.Tensor) -> torch.Tensor: ...

    def target_weights(self) -> dict[str, torch.Tensor]: ...

    def require_task(self, what: str) -> Any: ...

USES_NOTHING = "nothing"
USES_GENERIC = "generic images"
USES_INPUTS = "receiver inputs"
USES_LABELS = "receiver labels"


class Signal(ABC):
    """A way to score the candidate in a bench. Subclasses are frozen dataclasses of their source."""

    #: the name rules use (``NAME.MEASURE``) and the grid keys results by
    name: ClassVar[str]
    #: the values :meth:`measure` returns, by name
    measures: ClassVar[tuple[str, ...]]
    #: what receiver-side data the signal reads (one of USES_*)
    uses: ClassVar[str] = USES_NOTHING
    #: whether the signal's reference depends on the quantizer (the weight error does)
    per_quantizer: ClassVar[bool] = False

    @classmethod
    def create(cls, source: str | ProbeSet | None = None, size: int | None = None) -> Signal:
        """The signal on ``source`` (a probe path, ``noise``...) and ``size`` images, for those that take them."""
        return cls()

    def identity(self) -> dict:
        """What the signal's values depend on besides the candidate (content keys hash it)."""
        return asdict(self)  # type: ignore[call-overload]

    def prepare(self, bench: Bench, quant: Any) -> Any:
        """What the signal compares against, computed once per receiver with the receiver's FT weights in the bench
        (quantized by ``quant`` when the signal is ``per_quantizer``: plain PTQ of FT); None when there is nothing
        to prepare."""
        return None

    @abstractmethod
    def measure(self, bench: Bench, reference: Any) -> tuple[dict[str, float], int]:
        """The values of the candidate now in the bench, and how many examples (images, or weights) they used."""


SIGNALS: Registry[type[Signal]] = Registry("signal", builtins=("qvec.vectors.signals",))


def register_signal(cls: type[Signal]) -> type[Signal]:
    """Class decorator: make a signal available by its ``name`` (to lambda rules, ``choose_lambda`` and grids)."""
    SIGNALS.register(cls.name, cls)
    return cls


def make_signal(name: str, source: str | ProbeSet | None = None, size: int | None = None) -> Signal:
    """The registered signal ``name`` on ``source`` with ``size`` images (where it takes them)."""
    return SIGNALS.get(name).create(source, size)


def measures_of(name: str) -> tuple[str, ...]:
    return SIGNALS.get(name).measures


# ------------------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class _Split(Signal):
    """Top-1 on the receiver's own labelled split, the first ``limit`` examples (None: all of them)."""

    limit: int | None = None
    measures: ClassVar[tuple[str, ...]] = ("top1",)
    uses: ClassVar[str] = USES_LABELS
    split: ClassVar[str] = "val"

    @classmethod
    def create(cls, source: str | ProbeSet | None = None, size: int | None = None) -> Signal:
        return cls(size)

    def measure(self, bench: Bench, reference: Any) -> tuple[dict[str, float], int]:
        r = bench.evaluate(self.split, self.limit)
        return {"top1": r.accuracy}, r.n


@register_signal
@dataclass(frozen=True)
class ValSplit(_Split):
    """Top-1 on the receiver's validation split: what lambda* is chosen on (it uses the receiver's labels)."""

    name: ClassVar[str] = "val"


@register_signal
@dataclass(frozen=True)
class TrainSplit(_Split):
    """Top-1 on the receiver's training split (what ``qvec eval --split train`` reads)."""

    name: ClassVar[str] = "train"
    split: ClassVar[str] = "train"


@register_signal
@dataclass(frozen=True)
class TestSplit(_Split):
    """Top-1 on the receiver's test split: what every published number is."""

    name: ClassVar[str] = "test"
    split: ClassVar[str] = "test"


# -------------------------------------------------------------------------------------------- agreement
@dataclass(frozen=True)
class Reference:
    """The FT model's log-probabilities on a probe's preprocessed images: what the candidate must keep."""

    inputs: torch.Tensor
    logp: torch.Tensor

    @property
    def top1(self) -> torch.Tensor:
        return self.logp.argmax(dim=-1)


def agreement(logp_ref: torch.Tensor, logq: torch.Tensor) -> dict[str, float]:
    """``kl``: mean KL(FT || candidate) in nats per image; ``agree``: share of images with the FT model's top-1."""
    kl = (logp_ref.exp() * (logp_ref - logq)).sum(dim=-1).mean()
    agree = (logq.argmax(dim=-1) == logp_ref.argmax(dim=-1)).float().mean()
    return {"kl": float(kl), "agree": float(agree)}


@dataclass(frozen=True)
class ImageAgreement(Signal):
    """The candidate against the receiver's FT model on unlabeled images (no labels are read)."""

    size: int = 1000
    measures: ClassVar[tuple[str, ...]] = ("kl", "agree")

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise QvecError(f"signal {self.name!r} needs at least 1 image, got {self.size!r}")

    @abstractmethod
    def images(self, bench: Bench) -> ProbeSet:
        """The unlabeled images this signal scores on."""

    def source_name(self, bench: Bench) -> str:
        """How the images are named in a choice's record (a file name, ``noise``, ``TASK:val``)."""
        return self.name

    def prepare(self, bench: Bench, quant: Any) -> Reference:
        x = self.images(bench).tensors(bench.config)
        return Reference(x, bench.log_probs(x))

    def measure(self, bench: Bench, reference: Reference) -> tuple[dict[str, float], int]:
        return agreement(reference.logp, bench.log_probs(reference.inputs)), len(reference.logp)


@register_signal
@dataclass(frozen=True)
class GenericProbe(ImageAgreement):
    """Generic images that are not the receiver's: a folder, an ``.npz`` (e.g. a pretraining corpus) or noise."""

    source: str = ""
    name: ClassVar[str] = "probe"
    uses: ClassVar[str] = USES_GENERIC

    @classmethod
    def create(cls, source: str | ProbeSet | None = None, size: int | None = None) -> Signal:
        if source is None or (isinstance(source, str) and not source):
            raise QvecError("signal 'probe' needs probe images: a folder, an .npz file or 'noise'")
        if isinstance(source, ProbeSet):
            return _GivenProbe(size or len(source), source.name, source)
        return cls(size or 1000, str(source))

    def source_name(self, bench: Bench) -> str:
        return Path(self.source).name

    def images(self, bench: Bench) -> ProbeSet:
        if self.source == NOISE:
            return noise_probe(self.size, bench.config.image_size)
        return load_probe(Path(self.source), self.size, noise_size=bench.config.image_size)


@dataclass(frozen=True)
class _GivenProbe(GenericProbe):
    """A probe set given in memory (the library call ``choose_lambda(probe=ProbeSet)``)."""

    probe: ProbeSet | None = None

    def identity(self) -> dict:
        return {"size": self.size, "source": self.source}

    def source_name(self, bench: Bench) -> str:
        return self.source

    def images(self, bench: Bench) -> ProbeSet:
        assert self.probe is not None
        return self.probe


@register_signal
@dataclass(frozen=True)
class ReceiverInputs(ImageAgreement):
    """The receiver's own unlabeled inputs (its validation images, labels dropped)."""

    name: ClassVar[str] = "unlabeled"
    uses: ClassVar[str] = USES_INPUTS

    @classmethod
    def create(cls, source: str | ProbeSet | None = None, size: int | None = None) -> Signal:
        if isinstance(source, ProbeSet):
            return _GivenInputs(size or len(source), source)
        return cls(size or 1000)

    def source_name(self, bench: Bench) -> str:
        return f"{bench.require_task(self.name).name}:val"

    def images(self, bench: Bench) -> ProbeSet:
        return receiver_probe(bench.require_task(self.name), self.size)


@dataclass(frozen=True)
class _GivenInputs(ReceiverInputs):
    """The receiver's unlabeled inputs given in memory."""

    probe: ProbeSet | None = None

    def identity(self) -> dict:
        return {"size": self.size, "source": self.probe.name if self.probe is not None else ""}

    def source_name(self, bench: Bench) -> str:
        return self.probe.name if self.probe is not None else self.name

    def images(self, bench: Bench) -> ProbeSet:
        assert self.probe is not None
        return self.probe


@register_signal
@dataclass(frozen=True)
class Noise(ImageAgreement):
    """Uniform noise images: a probe that needs no data at all."""

    name: ClassVar[str] = "noise"
    uses: ClassVar[str] = USES_NOTHING

    @classmethod
    def create(cls, source: str | ProbeSet | None = None, size: int | None = None) -> Signal:
        return cls(size or 1000)

    def images(self, bench: Bench) -> ProbeSet:
        return noise_probe(self.size, bench.config.image_size)


# ---------------------------------------------------------------------------------------------- weights
def weight_errors(weights: Mapping[str, torch.Tensor], ft: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Squared distance of each (quantized) weight to the FT weight of the same name."""
    return {k: float((w.float() - ft[k].float()).pow(2).sum()) for k, w in weights.items()}


def weight_score(errs: Mapping[str, float], errs0: Mapping[str, float]) -> float:
    """The weight rule's metric: mean over layers of log(||Q(FT + lam tau) - FT|| / ||Q(FT) - FT||); 0 at lam = 0."""
    logs = [0.5 * math.log(max(errs[k], 1e-30) / max(errs0[k], 1e-30)) for k in errs]
    return sum(logs) / len(logs) if logs else 0.0


@register_signal
@dataclass(frozen=True)
class WeightError(Signal):
    """No images: the quantized candidate's weights against FT's, relative to the quantized FT model's."""

    name: ClassVar[str] = "weight"
    measures: ClassVar[tuple[str, ...]] = ("err",)
    per_quantizer: ClassVar[bool] = True

    def identity(self) -> dict:
        return {"source": "weights"}

    def prepare(self, bench: Bench, quant: Any) -> dict[str, float]:
        return weight_errors(bench.target_weights(), bench.ft)  # the bench holds Q(FT): lambda = 0

    def measure(self, bench: Bench, reference: dict[str, float]) -> tuple[dict[str, float], int]:
        weights = bench.target_weights()
        return {"err": weight_score(weight_errors(weights, bench.ft), reference)}, len(weights)


def log_probs(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-softmax outputs of ``model`` on ``x`` in batches (eval mode, inference mode, on the model's device)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                out.append(F.log_softmax(model(x[s : s + batch_size].to(device)).float(), dim=-1).cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0)
