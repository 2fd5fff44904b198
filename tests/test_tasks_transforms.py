"""qvec.tasks.transforms on torchvision's v2 ops gives bit for bit what the hand-written formulas gave.

The references below are the code that ``resize_batch`` and ``normalize`` replaced (``F.interpolate(...,
align_corners=False, antialias=scale < 1)``, then a centre crop and a clamp; ``(x - mean) / std``). The inputs are
the ones qvec feeds in: uint8 images turned into floats in [0, 1], 28..500 px, resized to 32..224 px, up and down.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qvec.data.tasks import normalize, resize_batch

MEAN_STD = [
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet (timm ViTs)
    ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI CLIP
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
]
SHAPES = [(32, 32), (28, 28), (32, 40), (40, 32), (64, 64), (96, 96), (375, 500), (17, 23)]
SIZES = [32, 48, 56, 224]


def reference_resize(x: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    kw = {} if mode == "nearest" else {"align_corners": False, "antialias": scale < 1}
    x = F.interpolate(x, size=(nh, nw), mode=mode, **kw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size].clamp(0.0, 1.0)


def images(h: int, w: int, n: int = 3, layout: str = "batch") -> torch.Tensor:
    """uint8 noise as float [0, 1]: a contiguous batch (npz splits, probe sets) or one image in the channels-last
    layout of HFSplit.load (HWC array permuted, unsqueezed)."""
    a = np.random.default_rng(h * 1000 + w).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    if layout == "batch":
        return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    return torch.from_numpy(a[0].copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


@pytest.mark.parametrize("layout", ["batch", "hf"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos"])
def test_resize_batch_equals_interpolate(interpolation, layout):
    down = up = 0
    for h, w in SHAPES:
        x = images(h, w, layout=layout)
        before = x.clone()
        for size in SIZES:
            got, want = resize_batch(x, size, interpolation), reference_resize(x, size, interpolation)
            assert got.shape == (x.shape[0], 3, size, size)
            assert torch.equal(got, want), (interpolation, layout, h, w, size)
            down, up = down + (min(h, w) > size), up + (min(h, w) < size)
        assert torch.equal(x, before)  # the input is never written
    assert down and up  # both the antialiased (shrinking) and the plain (growing) paths ran


def test_resize_batch_crop_only_does_not_clamp_the_input_in_place():
    x = torch.linspace(-1.0, 2.0, 3 * 32 * 40).view(1, 3, 32, 40)  # shorter side already 32: no resampling
    before = x.clone()
    y = resize_batch(x, 32)
    assert torch.equal(x, before)
    assert torch.equal(y, before[..., 4:36].clamp(0.0, 1.0))


def test_resize_batch_keeps_a_batch_already_at_size():
    x = images(56, 56)
    assert resize_batch(x, 56, "bicubic") is x


@pytest.mark.parametrize("mean, std", MEAN_STD)
def test_normalize_equals_formula_in_place(mean, std):
    x = images(56, 56, n=4)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    want = (x - m) / s
    out = normalize(x, mean, std)
    assert out is x  # in place, as the callers (train, evaluate, probe) expect
    assert torch.equal(out, want)


def test_resize_then_normalize_matches_the_old_pipeline():
    """What TaskSplit.tensors computes for a 32 px task and a 224 px bicubic CLIP model."""
    x = images(32, 32, n=8)
    mean, std = MEAN_STD[1]
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    want = (reference_resize(x, 224, "bicubic") - m) / s
    assert torch.equal(normalize(resize_batch(x, 224, "bicubic"), mean, std), want)
