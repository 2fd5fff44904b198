"""The model-adapter interface: what qvec needs to know about a model family.

An adapter says how to build a model (randomly initialised or with pretrained weights), which state-dict keys
are the classification head (never part of a quantization vector, never quantized), which modules are the
quantization targets, and how inputs are preprocessed. Families register themselves by name, as timm does for
architectures, so a checkpoint's header (``family:name``) is enough to rebuild its model.

The families live in a :class:`qvec.core.registry.Registry` whose built-ins are the family modules (timm and qvec's
own ViTs, OpenCLIP, Hugging Face): they are imported on the first lookup, not when qvec is, so a command that
builds no model never pays for importing timm or transformers.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable

import torch
from torch import nn

from qvec.core.errors import QvecError
from qvec.core.registry import Registry
from qvec.core.spec import _BARE_DEFAULT, _BARE_NAMES, _FAMILIES, _FAMILY_LOADERS, DataConfig, ModelSpec  # noqa: F401


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
        device (no memory, no weights); the default checks the option names only."""
        self.check_options(spec)

    def option_names(self, spec: ModelSpec) -> Collection[str] | None:
        """The option keys a spec of this family may carry (the arguments its constructor takes), or None when
        only building can tell (the constructor then refuses an unknown one)."""
        return None

    def check_options(self, spec: ModelSpec) -> None:
        """Option keys must be known to the family (:meth:`option_names`); the values are the constructor's to
        check, on the meta device (:func:`qvec.models.guard.meta_build`)."""
        known = self.option_names(spec)
        if known is None:
            return
        unknown = sorted(k for k in spec.options if k not in known)
        if unknown:
            import difflib

            close = difflib.get_close_matches(str(unknown[0]), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise QvecError(f"{spec}: unknown model option {unknown[0]!r}{hint}; {self.family} models take "
                            f"{', '.join(sorted(known)) or 'no options'}")

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


def constructor_options(cls: type, *, exclude: Collection[str] = ("self", "num_classes", "device", "dtype")
                        ) -> frozenset[str]:
    """The keyword arguments ``cls(...)`` takes (what a spec's options may name), less those qvec sets itself."""
    params = inspect.signature(cls.__init__).parameters.values()
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                     and p.name not in exclude)


#: Model families by name; the built-in family modules are imported on the first lookup.
ADAPTERS: Registry[ModelAdapter] = Registry(
    "model family", builtins=("qvec.models.timm_vit", "qvec.models.open_clip", "qvec.models.hf"),
    plural="model families")
_FAMILY_LOADERS.append(ADAPTERS.names)  # ModelSpec.parse knows the families without importing qvec.models


def register_adapter(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make a family available by its ``family`` name (to ``get_adapter`` and ModelSpec.parse)."""
    ADAPTERS.register(adapter_cls.family, adapter_cls())
    _FAMILIES[adapter_cls.family] = None
    return adapter_cls


def get_adapter(family: str | ModelSpec) -> ModelAdapter:
    """The adapter of a family (or of a spec's family); an unknown name is one line listing the known ones."""
    name = family.family if isinstance(family, ModelSpec) else family
    return ADAPTERS.get(name)


def families() -> list[str]:
    return sorted(ADAPTERS.names())


def claim_bare_names(family: str, names: Callable[[], Iterable[str]]) -> None:
    """Let ``--model NAME`` without ``family:`` mean ``family`` for these architecture names."""
    _BARE_NAMES.append((family, names))


def default_bare_family(family: str) -> None:
    """Bare names no family claims belong to ``family`` (one whose adapter takes any architecture name)."""
    _BARE_DEFAULT.insert(0, family)


def builtin_names() -> list[str]:
    ADAPTERS.names()  # the family modules add their bare names when imported
    return [n for _, f in _BARE_NAMES for n in f()]
