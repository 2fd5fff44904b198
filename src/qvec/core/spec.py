"""What a model is, as plain values: ``ModelSpec`` (family, architecture, classes, options) and ``DataConfig``
(input size and normalisation). Checkpoints record a ModelSpec in their header; this module imports nothing of
:mod:`qvec.models`, whose adapters register their family names here (``_FAMILIES``) and the bare names of
built-in architectures (``_BARE_NAMES``), so that checkpoints and models do not import each other.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from qvec.core.errors import QvecError

#: Family names of the registered model adapters (filled by ``qvec.models.base.register_adapter``).
_FAMILIES: dict[str, None] = {}
#: Bare architecture names (no ``family:``) that a family claims, as (family, names) pairs; a bare name nobody
#: claims belongs to the family in ``_BARE_DEFAULT`` (the family whose adapter takes any architecture name).
_BARE_NAMES: list[tuple[str, Callable[[], Iterable[str]]]] = []
_BARE_DEFAULT: list[str] = []
#: Called before a name is parsed: ``qvec.models`` puts its registry's loader here, so that the family modules
#: (imported on first use) have registered their names.
_FAMILY_LOADERS: list[Callable[[], object]] = []


@dataclass(frozen=True)
class ModelSpec:
    """A model's identity: family, architecture name, class count and build options (JSON-serialisable)."""

    family: str
    name: str
    num_classes: int = 0
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, num_classes: int = 0, **options) -> ModelSpec:
        """``family:name`` (``timm:vit_base_patch16_224``, ``qvec:vit-mini``); a bare name belongs to the family
        that claims it, else to the default family of bare names (the adapters register both)."""
        for load in _FAMILY_LOADERS:
            load()
        family, sep, name = text.partition(":")
        if not sep:
            name = text
            family = next((fam for fam, names in _BARE_NAMES if text in set(names())),
                          _BARE_DEFAULT[0] if _BARE_DEFAULT else "")
            if not family:
                raise QvecError(f"model {text!r}: give it as family:name (no family takes bare names)")
        if family not in _FAMILIES:
            raise QvecError(f"unknown model family {family!r}; known: {', '.join(sorted(_FAMILIES))}")
        return cls(family, name, num_classes, dict(options))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            d = json.loads(text)
            return cls(d["family"], d["name"], int(d.get("num_classes", 0)), dict(d.get("options", {})))
        except (ValueError, KeyError, TypeError) as e:
            raise QvecError(f"malformed model spec in checkpoint metadata: {e}") from None

    def with_classes(self, num_classes: int) -> ModelSpec:
        return ModelSpec(self.family, self.name, num_classes, dict(self.options))

    def __str__(self) -> str:
        return f"{self.family}:{self.name}"


@dataclass(frozen=True)
class DataConfig:
    """What a model expects as input: size, channels and normalisation."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
