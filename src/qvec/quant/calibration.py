"""Calibration images for the quantizers that need data (GPTQ): where they come from and what they must be.

A calibration set is unlabeled images: the receiver's own inputs, a generic folder or ``.npz``, or noise. They are
loaded as a :class:`qvec.data.probe.ProbeSet` and preprocessed for the model they calibrate.
"""

from __future__ import annotations

import torch

from qvec.core.errors import QvecError
from qvec.core.limits import check_fits
from qvec.core.spec import DataConfig
from qvec.data.probe import ProbeSet, load_probe

#: Fewer images than this give a Hessian that damping, not data, dominates; refused rather than silently used.
MIN_CALIBRATION_IMAGES = 8


def check_calibration(calibration: torch.Tensor | None, image_size: int | None = None, label: str = "GPTQ",
                      min_images: int = MIN_CALIBRATION_IMAGES) -> torch.Tensor:
    """Calibration images must be a finite (N, 3, H, W) float batch of at least ``min_images`` at the model's input
    size (one batch of a streamed set may be smaller); every problem is one QvecError naming the quantizer
    (``label``)."""
    if calibration is None or not isinstance(calibration, torch.Tensor) or calibration.numel() == 0:
        raise QvecError(f"{label} needs calibration images (unlabeled inputs: a folder, an .npz or noise); got none")
    if calibration.ndim != 4 or calibration.shape[1] != 3:
        raise QvecError(f"{label} calibration must be images of shape (N, 3, H, W), got {tuple(calibration.shape)}")
    if len(calibration) < min_images:
        raise QvecError(f"{label} needs at least {min_images} calibration images, got {len(calibration)}")
    if image_size is not None and tuple(calibration.shape[-2:]) != (image_size, image_size):
        h, w = calibration.shape[-2:]
        raise QvecError(f"{label} calibration images are {h}x{w}, but the model takes {image_size}x{image_size}")
    if not bool(torch.isfinite(calibration).all()):
        raise QvecError(f"{label} calibration images contain NaN or Inf")
    return calibration


def calibration_images(source: torch.Tensor | ProbeSet | str, n: int, config: DataConfig, label: str = "GPTQ"
                       ) -> tuple[torch.Tensor, dict]:
    """The calibration batch for a model with input ``config`` from a tensor, a probe set, or a path / ``noise``
    (``n`` images), and a record of which images were used."""
    if isinstance(n, bool) or not isinstance(n, int) or n < MIN_CALIBRATION_IMAGES:
        raise QvecError(f"{label} needs at least {MIN_CALIBRATION_IMAGES} calibration images, got {n!r} "
                        "(--calib-size)")
    check_fits(4 * n * 3 * config.image_size ** 2, f"--calib-size {n:,}: calibration images of "
               f"3x{config.image_size}x{config.image_size} floats", "ask for fewer (--calib-size)")
    if isinstance(source, torch.Tensor):
        x, record = source, {"source": "tensor", "images": len(source)}
    else:
        probe = source if isinstance(source, ProbeSet) else load_probe(source, n, noise_size=config.image_size)
        x, record = probe.tensors(config), {"source": probe.name, "images": len(probe)}
    return check_calibration(x, config.image_size, label), record
