"""Which weights a quantizer acts on: one :class:`TargetFilter` value, not a flag threaded through every call.

The paper quantizes every backbone ``nn.Linear`` weight and, for ``nn.MultiheadAttention``, the fused
``in_proj_weight`` (SPEC section 2); biases, norms, embeddings and the head stay in float. The authors' OpenCLIP PTQ
left ``in_proj_weight`` in float (``TargetFilter(in_proj=False)``); ``skip`` leaves further modules in float by
name prefix (e.g. the first block).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qvec.core.errors import QvecError


@dataclass(frozen=True)
class Target:
    """One quantization target: ``getattr(module, attr)`` is a weight; ``key`` is its state-dict name."""

    key: str
    module: nn.Module
    attr: str

    @property
    def weight(self) -> torch.Tensor:
        """The stored tensor behind the target (the latent weight when the module is QAT-parametrized)."""
        return raw_param(self.module, self.attr)


@dataclass(frozen=True)
class TargetFilter:
    """The weights PTQ and QAT quantize: backbone Linear weights, the fused ``in_proj_weight`` unless ``in_proj``
    is off, less the modules named by a prefix in ``skip``."""

    in_proj: bool = True
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.in_proj, bool):
            raise QvecError(f"in_proj must be true or false, got {self.in_proj!r}")
        if isinstance(self.skip, str) or not all(isinstance(s, str) and s for s in self.skip):
            raise QvecError(f"skip must be a list of module names, got {self.skip!r}")

    @classmethod
    def of(cls, value: TargetFilter | bool | dict | None) -> TargetFilter:
        """A filter from itself, from the ``include_in_proj`` flag older records hold, or from :meth:`to_dict`."""
        if value is None:
            return ALL_TARGETS
        if isinstance(value, TargetFilter):
            return value
        if isinstance(value, bool):
            return cls(in_proj=value)
        if isinstance(value, dict):
            return cls(bool(value.get("in_proj", True)), tuple(value.get("skip", ())))
        raise QvecError(f"a target filter is a TargetFilter, true/false (in_proj) or a table, got {value!r}")

    def to_dict(self) -> dict:
        return {"in_proj": self.in_proj, **({"skip": list(self.skip)} if self.skip else {})}

    def record(self) -> bool | dict:
        """What content keys and headers hold: the ``in_proj`` flag alone when nothing is skipped (so records made
        before the filter existed keep their keys), else the whole filter."""
        return self.in_proj if not self.skip else self.to_dict()

    def skips(self, name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in self.skip)

    def find(self, model: nn.Module, head_prefixes: Iterable[str] = ("head",)) -> list[Target]:
        """The targets of ``model`` whose head modules are named by ``head_prefixes``."""
        heads = tuple(head_prefixes)
        targets: list[Target] = []
        for name, module in model.named_modules():
            if any(name == h or name.startswith(h + ".") for h in heads) or self.skips(name):
                continue
            prefix = f"{name}." if name else ""
            if isinstance(module, nn.Linear):
                targets.append(Target(prefix + "weight", module, "weight"))
            elif isinstance(module, nn.MultiheadAttention) and self.in_proj and module.in_proj_weight is not None:
                targets.append(Target(prefix + "in_proj_weight", module, "in_proj_weight"))
        return targets

    def __str__(self) -> str:
        parts = [] if self.in_proj else ["no in_proj"]
        parts += [f"skip {s}" for s in self.skip]
        return ", ".join(parts) or "all Linear weights"


#: The paper's targets (SPEC section 2), the default everywhere.
ALL_TARGETS = TargetFilter()


def find_targets(model: nn.Module, head_prefixes: Iterable[str] = ("head",),
                 targets: TargetFilter | bool = ALL_TARGETS) -> list[Target]:
    """The weights PTQ and QAT act on (see :class:`TargetFilter`); ``head_prefixes`` name the head's modules."""
    return TargetFilter.of(targets).find(model, head_prefixes)


def raw_param(module: nn.Module, attr: str) -> torch.Tensor:
    """The stored tensor behind ``attr`` (the latent weight when the module is QAT-parametrized)."""
    params = getattr(module, "parametrizations", None)
    if params is not None and attr in params:
        return params[attr].original
    return getattr(module, attr)
