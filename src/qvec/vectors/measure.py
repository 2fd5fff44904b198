"""The measurement core: set a candidate (receiver + lambda * tau, quantized) in a receiver's model and score it.

Every number qvec reports goes through here: ``qvec eval``, ``qvec patch --lam auto`` (:func:`choose_lambda`), and
every cell, baseline and pipeline of a study (the grid schedules and stores these calls, it computes nothing of
its own). A :class:`Bench` holds one receiver's model, built once, with handles on its backbone tensors; a
candidate is written into them in place (``torch.add(base, tau, alpha=lam, out=...)``), quantized by any registered
quantizer, and scored by one or several signals (:mod:`qvec.vectors.signals`). The candidate in the model is
remembered, so several signals on one candidate cost one patch and one quantization.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qvec.core.checkpoint import Checkpoint
from qvec.core.errors import QvecError
from qvec.data.probe import NOISE, ProbeSet, load_probe, noise_probe, receiver_probe
from qvec.data.tasks import Task
from qvec.models import load_model
from qvec.quant import QuantizerConfig, QuantSpec, as_quantizer, quantize_
from qvec.quant.calibration import calibration_images
from qvec.quant.targets import ALL_TARGETS, TargetFilter
from qvec.train.evaluate import EvalResult, evaluate
from qvec.vectors.signals import Signal, log_probs
from qvec.vectors.vector import QuantVector

#: Where a calibrated quantizer's images come from, besides a path: the receiver's own unlabeled training inputs.
RECEIVER = "receiver"


@dataclass(frozen=True)
class Measurement:
    """One signal's values on one candidate, with what they cost."""

    values: dict[str, float]
    #: examples (images, or weights for the weight signal) the values are over
    n: int
    #: seconds to write the candidate's weights, to quantize them, and to score them
    patch_seconds: float = 0.0
    ptq_seconds: float = 0.0
    seconds: float = 0.0

    def __getitem__(self, measure: str) -> float:
        return self.values[measure]


class Bench:
    """One receiver's model, loaded once, on which candidates are set and measured.

    ``receiver`` is the receiver's fine-tuned checkpoint (its head is kept for every candidate); ``task`` is its
    task, needed by the labelled signals, by its unlabeled inputs and by receiver calibration; ``targets`` are the
    weights quantizers act on.
    """

    def __init__(self, receiver: Checkpoint | str | Path, task: Task | None = None, *,
                 targets: TargetFilter | bool = ALL_TARGETS, batch_size: int | None = None) -> None:
        ck = receiver if isinstance(receiver, Checkpoint) else Checkpoint.load(receiver)
        self.receiver = ck
        self.task = task
        self.model, self.adapter, self.spec = load_model(ck)
        for p in self.model.parameters():
            p.requires_grad_(False)
        live = self.model.state_dict(keep_vars=True)
        keys = self.adapter.backbone_keys({k: v.detach() for k, v in live.items()})
        #: handles on the model's backbone tensors (the candidate is written into these)
        self.backbone = {k: live[k].detach() for k in keys}
        #: the receiver's own FT backbone (a copy: the handles change with every candidate)
        self.ft = {k: v.clone() for k, v in self.backbone.items()}
        self.targets = TargetFilter.of(targets).find(self.model, self.adapter.head_prefixes)
        outside = [t.key for t in self.targets if t.key not in self.backbone]
        if outside:
            raise QvecError(f"quantization target {outside[0]!r} is not a backbone tensor of {self.spec}")
        self.config = self.adapter.data_config(self.spec, self.model)
        self.batch_size = batch_size
        self._candidate: tuple | None = None
        self._cost = (0.0, 0.0)
        self._prepared: dict[str, object] = {}
        self._calibration: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ candidate
    @torch.no_grad()
    def set_weights(self, vector: QuantVector | None = None, lam: float = 0.0,
                    base: Mapping[str, torch.Tensor] | None = None) -> None:
        """Backbone <- ``base`` (default: the receiver's FT backbone) + ``lam`` * ``vector``; the head is kept."""
        base = self.ft if base is None else base
        for k, dst in self.backbone.items():
            if k not in base:
                raise QvecError(f"backbone tensor {k!r} is missing from the source weights")
            if vector is not None and lam and k in vector.tensors:
                torch.add(base[k], vector.tensors[k], alpha=lam, out=dst)
            else:
                dst.copy_(base[k])
        self._candidate = None

    def apply(self, vector: QuantVector | None = None, lam: float = 0.0,
              quant: QuantizerConfig | QuantSpec | None = None, base: Mapping[str, torch.Tensor] | None = None,
              calibration: torch.Tensor | ProbeSet | str | None = None, calibration_size: int = 128
              ) -> tuple[float, float]:
        """Put the candidate ``quant(base + lam * vector)`` in the model (nothing to do when it is already there);
        returns the seconds spent patching and quantizing it. ``quant`` None leaves it in float."""
        if vector is not None:
            vector.check_applicable(self.ft, self.receiver.name("the receiver"), lam)
        quant = as_quantizer(quant) if quant is not None else None
        key = (vector, float(lam) if vector is not None else 0.0, _record(quant), base, _calib_key(calibration),
               calibration_size)
        if self._candidate is not None and _same(self._candidate, key):
            return self._cost
        t0 = time.perf_counter()
        self.set_weights(vector, lam, base)
        t1 = time.perf_counter()
        if quant is not None:
            x = self.calibration(calibration, calibration_size, quant) if quant.needs_calibration else None
            quantize_(self.model, quant, self.targets, x)
        self._candidate, self._cost = key, (t1 - t0, time.perf_counter() - t1)
        return self._cost

    def calibration(self, source: torch.Tensor | ProbeSet | str | None, n: int, quant: QuantizerConfig
                    ) -> torch.Tensor:
        """A calibrated quantizer's images, preprocessed for this model (cached): the receiver's own unlabeled
        training inputs (``receiver``), ``noise``, a folder or ``.npz``, a probe set or a tensor."""
        if source is None:
            raise QvecError(f"{quant.label} needs calibration images: 'receiver', 'noise', a folder or an .npz")
        if isinstance(source, torch.Tensor):
            return calibration_images(source, n, self.config, quant.label)[0]
        key = (str(source) if not isinstance(source, ProbeSet) else id(source), n)
        if key not in self._calibration:
            if isinstance(source, ProbeSet):
                probe = source
            elif source == RECEIVER:
                probe = receiver_probe(self.require_task("calibration 'receiver'"), n, split="train")
            elif source == NOISE:
                probe = noise_probe(n, self.config.image_size)
            else:
                probe = load_probe(source, n, noise_size=self.config.image_size)
            self._calibration[key] = calibration_images(probe, n, self.config, quant.label)[0]
        return self._calibration[key]

    # ------------------------------------------------------------------------------------------ scoring
    def measure(self, signals: Signal | Sequence[Signal], *, vector: QuantVector | None = None, lam: float = 0.0,
                quant: QuantizerConfig | QuantSpec | None = None, base: Mapping[str, torch.Tensor] | None = None,
                calibration: torch.Tensor | ProbeSet | str | None = None, calibration_size: int = 128
                ) -> dict[str, Measurement]:
        """Score the candidate ``quant(base + lam * vector)`` with each signal; by signal name."""
        signals = [signals] if isinstance(signals, Signal) else list(signals)
        refs = {s.name: self.reference(s, quant, calibration, calibration_size) for s in signals}
        patch_s, ptq_s = self.apply(vector, lam, quant, base, calibration, calibration_size)
        out = {}
        for s in signals:
            t0 = time.perf_counter()
            values, n = s.measure(self, refs[s.name])
            out[s.name] = Measurement(values, n, patch_s, ptq_s, time.perf_counter() - t0)
        return out

    def reference(self, signal: Signal, quant=None, calibration=None, calibration_size: int = 128) -> object:
        """What ``signal`` compares against, prepared once (with the receiver's FT weights, or plain PTQ of them
        for the weight signal)."""
        quant = as_quantizer(quant) if quant is not None else None
        key = json.dumps([signal.name, signal.identity(), _record(quant) if signal.per_quantizer else None],
                         sort_keys=True, default=str)
        if key not in self._prepared:
            self.apply(quant=quant if signal.per_quantizer else None, calibration=calibration,
                       calibration_size=calibration_size)
            self._prepared[key] = signal.prepare(self, quant)
        return self._prepared[key]

    # -------------------------------------------------------------------------------- what signals read
    def evaluate(self, split: str, limit: int | None = None) -> EvalResult:
        """Top-1 of the candidate on the receiver's labelled ``split``."""
        return evaluate(self.model, self.require_task(f"the {split} split"), split, batch_size=self.batch_size,
                        limit=limit, config=self.config)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The candidate's log-probabilities on preprocessed images ``x``."""
        return log_probs(self.model, x, self.batch_size or 64)

    def target_weights(self) -> dict[str, torch.Tensor]:
        """The candidate's (quantized) target weights, by state-dict name."""
        return {t.key: self.backbone[t.key] for t in self.targets}

    def require_task(self, what: str) -> Task:
        if self.task is None:
            raise QvecError(f"{what} needs the receiver's task (task=...)")
        return self.task


def measure(bench: Bench, signal: Signal, *, vector: QuantVector | None = None, lam: float = 0.0,
            quant: QuantizerConfig | QuantSpec | None = None, base: Mapping[str, torch.Tensor] | None = None,
            calibration: torch.Tensor | ProbeSet | str | None = None, calibration_size: int = 128) -> Measurement:
    """One signal of the candidate ``quant(base + lam * vector)`` on ``bench``'s receiver (see :class:`Bench`)."""
    return bench.measure(signal, vector=vector, lam=lam, quant=quant, base=base, calibration=calibration,
                         calibration_size=calibration_size)[signal.name]


def _record(quant: QuantizerConfig | None) -> str | None:
    return None if quant is None else json.dumps(quant.to_dict(), sort_keys=True)


def _calib_key(calibration) -> object:
    return calibration if isinstance(calibration, torch.Tensor | ProbeSet) else str(calibration)


def _same(a: tuple, b: tuple) -> bool:
    """Whether two candidate keys name the same candidate (objects by identity, the rest by value)."""
    return all(x is y if isinstance(x, QuantVector | Mapping | torch.Tensor | ProbeSet) else x == y
               for x, y in zip(a, b, strict=True))
