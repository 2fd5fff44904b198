"""Image preprocessing shared by task splits and probe sets: shorter-side resize + centre crop, and normalisation.

A module of its own because it is the one place where a model's :class:`~qvec.models.DataConfig` turns into pixel
arithmetic, used by :mod:`qvec.tasks.splits`, :mod:`qvec.probe`, :mod:`qvec.train` and :mod:`qvec.evaluate`.
Both functions call torchvision's v2 functional ops. On float tensors these are ``F.interpolate(...,
align_corners=False, antialias=...)`` and ``(x - mean) / std``, so the outputs equal the hand-written formulas they
replaced bit for bit (``tests/test_tasks_transforms.py`` checks this). ``antialias`` is passed explicitly, on only
when downsampling as before: v2's default (on) would change upsampled images, by float rounding (about 1e-6) for
bilinear and by up to 0.1 for bicubic, whose antialiased kernel is Pillow's (cubic coefficient a = -0.5, weights
renormalised at the borders) rather than the a = -0.75 of ``F.interpolate(..., antialias=False)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

RESIZE_MODES = ("bilinear", "bicubic", "nearest")


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place: ``(x - mean) / std`` per channel of a (B, 3, H, W) float batch."""
    return TF.normalize(x, list(mean), list(std), inplace=True)


def resize_batch(x: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize a float batch so the shorter side is ``size``, then centre-crop to ``size`` x ``size`` and clamp the
    values to [0, 1]. An unknown ``interpolation`` (``lanczos``, say) falls back to bilinear; ``nearest`` is never
    antialiased, the other two are when the batch shrinks. A batch already ``size`` x ``size`` is returned as is."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    mode = interpolation if interpolation in RESIZE_MODES else "bilinear"
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    y = TF.resize(x, [nh, nw], interpolation=InterpolationMode(mode), antialias=mode != "nearest" and scale < 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    # out of place: when only a crop is needed, TF.resize returns ``x`` itself, which must not be clamped in place
    return y[..., top : top + size, left : left + size].clamp(0.0, 1.0)
