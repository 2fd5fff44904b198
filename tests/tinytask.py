"""Small real datasets written to disk for the training/eval tests (no shared data needed).

``stripes``: class c is a grating at angle c * 45 degrees with random phase, frequency, colour and noise, so a tiny
ViT learns it in a few steps. Written in the exact ``.npz`` task format of the data README, and as a JPEG corpus in
the ``pretrain_cifar10.npz`` format.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

CLASSES = ["0deg", "45deg", "90deg", "135deg"]


def stripes(n: int, seed: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    x = np.empty((n, 32, 32, channels), np.uint8)
    for i, c in enumerate(y):
        a = np.pi * c / 4
        f = rng.uniform(0.3, 0.6)
        g = np.sin(f * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 2 * np.pi))
        col = rng.uniform(0.4, 1.0, channels)
        img = 127.5 + 110 * g[..., None] * col + rng.normal(0, 12, (32, 32, channels))
        x[i] = np.clip(img, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


def write_task(folder: Path, name: str = "stripes", n_train: int = 200, n_test: int = 80, channels: int = 3,
               **override) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    xtr, ytr = stripes(n_train, 1, channels)
    xte, yte = stripes(n_test, 2, channels)
    arrays = dict(x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, classes=np.array(CLASSES))
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def write_jpeg_corpus(path: Path, n: int = 160) -> Path:
    from PIL import Image

    x, y = stripes(n, 3)
    blobs = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, y=y, classes=np.array(CLASSES))
    return path
