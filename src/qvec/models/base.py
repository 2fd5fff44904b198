"""The model-adapter interface: what qvec needs to know about a model family.

An adapter says how to build a model (randomly initialised or with pretrained weights), which state-dict keys
are the classification head (never part of a quantization vector, never quantized), which modules are the
quantization targets, and how inputs are preprocessed. Families register themselves by name, as timm does for
architectures, so a checkpoint's header (``family:name``) is enough to rebuild its model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from qvec.core.errors import QvecError
from qvec.core.spec import _BARE_NAMES, _FAMILIES, DataConfig, ModelSpec  # noqa: F401  (re-exported: the models' API)


class ModelAdapter(ABC):
    """How qvec builds, splits (backbone vs head) and quantizes one model family."""

    family: str = ""
    head_prefixes: tuple[str, ...] = ("head",)
    #: the family has pretrained weights to fetch by name (a hub); False for architectures trained here only
    has_hub_weights: bool = True

    @abstractmethod
    def build(self, spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
        """A model for ``spec``; with ``pretrained`` its hub weights, or those in the file ``weights``."""

    @abstractmethod
    def data_config(self, spec: ModelSpec, model: nn.Module | None = None) -> DataConfig:
        """The input resolution and normalisation this model was (pre)trained with."""

    def names(self) -> list[str]:
        """Architecture names this family can build (may be a sample for open-ended families)."""
        return []

    def is_head(self, key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in self.head_prefixes)

    def backbone_keys(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Floating-point keys that belong to the backbone (the quantization vector's domain)."""
        return [k for k, v in state.items() if v.is_floating_point() and not self.is_head(k)]

    def infer_num_classes(self, state: dict[str, torch.Tensor]) -> int:
        """The class count of a state dict, read off the first 2-D head weight (0 when there is no head)."""
        for k, v in state.items():
            if self.is_head(k) and k.endswith("weight") and v.ndim == 2:
                return int(v.shape[0])
        return 0

    def check_spec(self, spec: ModelSpec) -> None:
        """Raise a one-line QvecError when ``spec`` cannot be built (unknown name, bad options, an input size the
        patch grid cannot take), before any work starts. Families that build without network do it on the meta
        device (no memory, no weights); the default checks nothing."""
        return None

    def _check_by_meta_build(self, spec: ModelSpec) -> None:
        try:
            with torch.device("meta"):
                self.build(spec.with_classes(spec.num_classes or 2), pretrained=False)
        except QvecError:
            raise
        except Exception as e:  # a constructor's own complaint about an option
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QvecError(f"cannot build {spec} with options {spec.options}: {first[:200]}") from None

    def filter_state(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Adapt a pretrained state dict to ``model`` before loading (timm: resample the position embedding to
        the model's input size, convert foreign layouts); the identity by default."""
        return state

    def trainable_head(self, spec: ModelSpec) -> bool:
        """True when the head is trained with the backbone (supervised ViTs); False for frozen zero-shot heads."""
        return True

    def init_head(self, model: nn.Module, spec: ModelSpec, classnames: list[str], task: str) -> None:
        """Prepare the head of a freshly built model for a task before FT/QAT.

        Supervised families keep the randomly initialised linear head (trained jointly); CLIP families
        overwrite it with the frozen zero-shot head built from the text encoder.
        """
        return None


_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make a family available by its ``family`` name (to ``get_adapter`` and ModelSpec.parse)."""
    _REGISTRY[adapter_cls.family] = adapter_cls()
    _FAMILIES[adapter_cls.family] = None
    return adapter_cls


def get_adapter(family: str | ModelSpec) -> ModelAdapter:
    name = family.family if isinstance(family, ModelSpec) else family
    if name not in _REGISTRY:
        raise QvecError(f"unknown model family {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def families() -> list[str]:
    return sorted(_REGISTRY)


_BUILTIN_NAMES = _BARE_NAMES


def builtin_names() -> list[str]:
    return [n for f in _BUILTIN_NAMES for n in f()]
