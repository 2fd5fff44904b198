"""Named quantizer presets, so that a user picks ``hqq-g64`` rather than assembling flags.

A preset is a quantizer method, a grid without its bit-width, and the quantizer's knobs; ``preset(name, bits)``
is the config. ``paper`` is the paper's RTN (symmetric per-channel, 2^b - 1 levels), unchanged, for
reproductions; the others are the data-free quantizers a deployment would use, and GPTQ for when unlabeled
images exist. Bits per weight of each (codes, fp16 scales, zero points) are listed by ``qvec presets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qvec.core.errors import QvecError
from qvec.core.registry import Registry
from qvec.quant.base import QuantizerConfig, get_quantizer
from qvec.quant.grid import QuantSpec


@dataclass(frozen=True)
class Preset:
    """A quantizer method on a grid (all but the bit-width), with its knobs."""

    name: str
    method: str
    description: str
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128
    full_range: bool = False
    knobs: dict = field(default_factory=dict)

    def grid(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.symmetric, self.granularity, self.group_size, self.full_range)  # type: ignore[arg-type]

    def config(self, bits: int) -> QuantizerConfig:
        """The quantizer config of this preset at ``bits``."""
        return get_quantizer(self.method).from_grid(self.grid(bits), **self.knobs)


PRESETS: Registry[Preset] = Registry("preset", builtins=("qvec.quant.presets",))


def register_preset(p: Preset) -> Preset:
    PRESETS.register(p.name, p)
    return p


def get_preset(name: str) -> Preset:
    """The preset named ``name``; one line naming the known ones otherwise."""
    return PRESETS.get(name)


def preset(name: str, bits: int) -> QuantizerConfig:
    """The quantizer config of preset ``name`` at ``bits`` (``preset("hqq-g64", 3)``)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise QvecError(f"bits must be an integer in 2..8, got {bits!r}")
    return get_preset(name).config(bits)


for _p in (
    Preset("paper", "rtn", "the paper's RTN: symmetric, per channel, 2^b - 1 levels (SPEC section 2)"),
    Preset("full", "rtn", "RTN, symmetric per channel on the full range: all 2^b levels", full_range=True),
    Preset("clip", "clip", "RTN with a searched clip ratio per channel, on the paper's grid (same storage)"),
    Preset("clip-full", "clip", "clip search on the full-range symmetric per-channel grid", full_range=True),
    Preset("g64", "rtn", "RTN, asymmetric, groups of 64 inputs", symmetric=False, granularity="group", group_size=64),
    Preset("g128", "rtn", "RTN, asymmetric, groups of 128 inputs", symmetric=False, granularity="group"),
    Preset("clip-g64", "clip", "clip search per group of 64, asymmetric", symmetric=False, granularity="group",
           group_size=64),
    Preset("hqq-g64", "hqq", "HQQ, asymmetric, groups of 64 (real-valued zero points)", symmetric=False,
           granularity="group", group_size=64),
    Preset("hqq-g128", "hqq", "HQQ, asymmetric, groups of 128 (real-valued zero points)", symmetric=False,
           granularity="group"),
    Preset("gptq", "gptq", "GPTQ on the paper's grid (needs unlabeled calibration images)"),
    Preset("gptq-g64", "gptq", "GPTQ, asymmetric, groups of 64 (needs unlabeled calibration images)",
           symmetric=False, granularity="group", group_size=64),
):
    register_preset(_p)
