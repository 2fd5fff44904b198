"""A procedurally generated 32x32 image-task suite, so that ``qvec demo`` needs no network and no data folder.

Five small classification tasks with different but related structure (orientation, shape, glyph identity,
colour, texture), plus a pretraining corpus drawn from all five generators. They are written in exactly the format
of the real suite in ``../shared/data`` (see its README): one ``<task>.npz`` per task with ``x_train``, ``y_train``,
``x_test``, ``y_test``, ``classes``, and a ``pretrain_synthetic.npz`` of JPEG bytes with ``jpeg``, ``offsets``,
``y`` and ``classes``. Anything that reads the real suite reads this one.

Generation is deterministic (``numpy.random.default_rng`` seeded per task and split) and cached: a directory that
already holds a suite written with the same parameters and generator version is reused as is.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from qvec.core.atomic import make_folder
from qvec.core.checkpoint import atomic_path
from qvec.core.errors import QvecError

#: Bumped whenever a generator changes, so stale caches are regenerated rather than silently reused.
GENERATOR_VERSION = 1
PRETRAIN_FILE = "pretrain_synthetic.npz"
_MANIFEST = "synthetic.json"
_SIZE = 32

Generator = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0.0, 1.0)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _random_colour(rng: np.random.Generator, low: float = 0.0, high: float = 1.0) -> tuple[int, int, int]:
    c = rng.uniform(low, high, 3)
    return tuple(int(v * 255) for v in c)


# ------------------------------------------------------------------------------------------------ generators
GRATING_CLASSES = [f"{int(a)}deg" for a in np.arange(0, 180, 22.5)]


def _gratings(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sinusoidal gratings; the class is the orientation (8 bins of 22.5 degrees), jittered by +-5 degrees."""
    y = rng.integers(0, len(GRATING_CLASSES), n)
    theta = np.deg2rad(y * 22.5 + rng.uniform(-5, 5, n))
    freq = rng.uniform(2.0, 5.0, n) * 2 * math.pi / _SIZE
    phase = rng.uniform(0, 2 * math.pi, n)
    contrast = rng.uniform(0.25, 0.5, n)
    yy, xx = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float64)
    proj = np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy
    img = 0.5 + contrast[:, None, None] * np.sin(freq[:, None, None] * proj + phase[:, None, None])
    img = _noise(rng, img, 0.08)
    return _to_uint8(img)[..., None], y


SHAPE_CLASSES = ["circle", "square", "triangle", "cross", "ring", "diamond"]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill, width: int) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif kind == "cross":
        draw.line([cx - r, cy, cx + r, cy], fill=fill, width=width)
        draw.line([cx, cy - r, cx, cy + r], fill=fill, width=width)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=width)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # pragma: no cover - the class lists above are the only callers
        raise ValueError(kind)


def _shapes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One filled or outlined shape at a random place, size and colour on a noisy background."""
    y = rng.integers(0, len(SHAPE_CLASSES), n)
    out = np.empty((n, _SIZE, _SIZE, 3), np.uint8)
    for i in range(n):
        bg = np.array(_random_colour(rng, 0.0, 0.5))
        fg = np.array(_random_colour(rng, 0.5, 1.0))
        if rng.random() < 0.5:  # sometimes a light background with a dark shape
            bg, fg = 255 - bg, 255 - fg
        im = Image.new("RGB", (_SIZE, _SIZE), tuple(int(v) for v in bg))
        r = rng.uniform(6, 12)
        cx, cy = rng.uniform(r + 1, _SIZE - r - 1, 2)
        fill = tuple(int(v) for v in fg)
        _draw_shape(ImageDraw.Draw(im), SHAPE_CLASSES[y[i]], cx, cy, r, fill, int(rng.integers(2, 4)))
        out[i] = _to_uint8(_noise(rng, np.asarray(im, np.float64) / 255.0, 0.06))
    return out, y


# Seven-segment layout: segments a..g as (x0, y0, x1, y1) on a unit box, and which ones each digit lights.
_SEGMENTS = {
    "a": (0, 0, 1, 0), "b": (1, 0, 1, 0.5), "c": (1, 0.5, 1, 1), "d": (0, 1, 1, 1),
    "e": (0, 0.5, 0, 1), "f": (0, 0, 0, 0.5), "g": (0, 0.5, 1, 0.5),
}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]
GLYPH_CLASSES = [str(d) for d in range(10)]


def _glyphs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Seven-segment digits with random size, slant, stroke width and endpoint jitter (a digits-like task)."""
    y = rng.integers(0, 10, n)
    out = np.empty((n, _SIZE, _SIZE, 1), np.uint8)
    for i in range(n):
        im = Image.new("L", (_SIZE, _SIZE), int(rng.integers(0, 40)))
        draw = ImageDraw.Draw(im)
        w, h = rng.uniform(9, 14), rng.uniform(16, 24)
        x0, y0 = rng.uniform(2, _SIZE - w - 2), rng.uniform(2, _SIZE - h - 2)
        slant = rng.uniform(-0.25, 0.25)
        ink = int(rng.integers(170, 256))
        width = int(rng.integers(2, 4))
        for seg in _DIGITS[y[i]]:
            sx0, sy0, sx1, sy1 = _SEGMENTS[seg]
            pts = []
            for sx, sy in ((sx0, sy0), (sx1, sy1)):
                px = x0 + sx * w + slant * (h - sy * h) + rng.normal(0, 0.6)
                py = y0 + sy * h + rng.normal(0, 0.6)
                pts.append((px, py))
            draw.line(pts, fill=ink, width=width)
        out[i, ..., 0] = _to_uint8(_noise(rng, np.asarray(im, np.float64) / 255.0, 0.05))
    return out, y


BLOB_CLASSES = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta"]


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    import matplotlib.colors as mcolors

    return mcolors.hsv_to_rgb(np.stack([h, s, v], -1))


def _blobs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian colour blobs; the class is the hue of the largest blob, among smaller distractors."""
    y = rng.integers(0, len(BLOB_CLASSES), n)
    yy, xx = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float64)
    out = np.empty((n, _SIZE, _SIZE, 3), np.uint8)
    for i in range(n):
        img = np.full((_SIZE, _SIZE, 3), rng.uniform(0.0, 0.25))
        k = int(rng.integers(1, 4))  # distractors
        hues = np.concatenate([[y[i] / len(BLOB_CLASSES) + rng.uniform(-0.03, 0.03)], rng.uniform(0, 1, k)]) % 1.0
        sizes = np.concatenate([[rng.uniform(6, 9)], rng.uniform(2, 4, k)])
        for hue, sigma in zip(hues, sizes, strict=True):
            cx, cy = rng.uniform(4, _SIZE - 4, 2)
            mask = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))[..., None]
            colour = _hsv_to_rgb(np.array(hue), np.array(rng.uniform(0.7, 1.0)), np.array(rng.uniform(0.8, 1.0)))
            img = img * (1 - mask) + colour * mask
        out[i] = _to_uint8(_noise(rng, img, 0.04))
    return out, y


TEXTURE_CLASSES = ["stripes", "checker", "dots", "smooth", "speckle", "zigzag"]


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    coarse = rng.uniform(0, 1, (cells, cells))
    im = Image.fromarray(_to_uint8(coarse)).resize((_SIZE, _SIZE), Image.BICUBIC)
    return np.asarray(im, np.float64) / 255.0


def _textures(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Repetitive colour textures at random scale, phase and palette; the class is the pattern type."""
    y = rng.integers(0, len(TEXTURE_CLASSES), n)
    yy, xx = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float64)
    out = np.empty((n, _SIZE, _SIZE, 3), np.uint8)
    for i in range(n):
        period = rng.uniform(4, 9)
        ox, oy = rng.uniform(0, period, 2)
        kind = TEXTURE_CLASSES[y[i]]
        if kind == "stripes":
            ang = rng.uniform(0, math.pi)
            m = (np.floor((np.cos(ang) * xx + np.sin(ang) * yy + ox) / period * 2) % 2).astype(np.float64)
        elif kind == "checker":
            m = ((np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2).astype(np.float64)
        elif kind == "dots":
            dx = (xx + ox) % period - period / 2
            dy = (yy + oy) % period - period / 2
            m = (dx**2 + dy**2 < (period / 3.5) ** 2).astype(np.float64)
        elif kind == "smooth":
            m = _smooth_noise(rng, int(rng.integers(3, 6)))
        elif kind == "speckle":
            m = (rng.uniform(0, 1, (_SIZE, _SIZE)) < rng.uniform(0.2, 0.5)).astype(np.float64)
        else:  # zigzag
            tri = np.abs(((xx + ox) / period) % 2 - 1) * period
            m = (np.floor((yy + tri + oy) / (period / 1.5)) % 2).astype(np.float64)
        c0 = np.array(_random_colour(rng)) / 255.0
        c1 = np.array(_random_colour(rng)) / 255.0
        if np.abs(c0 - c1).sum() < 0.6:  # keep the two colours apart so every pattern is visible
            c1 = 1.0 - c0
        img = c0 * (1 - m[..., None]) + c1 * m[..., None]
        out[i] = _to_uint8(_noise(rng, img, 0.05))
    return out, y


#: name -> (generator, class names). Names carry a ``syn_`` prefix so they never clash with real tasks.
SYNTHETIC_TASKS: dict[str, tuple[Generator, list[str]]] = {
    "syn_gratings": (_gratings, GRATING_CLASSES),
    "syn_shapes": (_shapes, SHAPE_CLASSES),
    "syn_glyphs": (_glyphs, GLYPH_CLASSES),
    "syn_blobs": (_blobs, BLOB_CLASSES),
    "syn_textures": (_textures, TEXTURE_CLASSES),
}


def default_cache_dir() -> Path:
    """``$QVEC_CACHE/synthetic`` or ``~/.cache/qvec/synthetic``."""
    root = os.environ.get("QVEC_CACHE") or Path.home() / ".cache" / "qvec"
    return Path(root) / "synthetic"


def _task_seed(name: str, split: str, seed: int) -> np.random.Generator:
    # A stable per-(task, split) stream: adding a task never changes the images of another.
    digest = sum((i + 1) * ord(c) for i, c in enumerate(f"{name}/{split}"))
    return np.random.default_rng([seed, digest])


def _as_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def generate_task(name: str, n_train: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of one synthetic task (the ``.npz`` layout of the real suite)."""
    if name not in SYNTHETIC_TASKS:
        raise QvecError(f"unknown synthetic task {name!r}; known: {', '.join(SYNTHETIC_TASKS)}")
    gen, classes = SYNTHETIC_TASKS[name]
    x_tr, y_tr = gen(_task_seed(name, "train", seed), n_train)
    x_te, y_te = gen(_task_seed(name, "test", seed), n_test)
    return {
        "x_train": x_tr, "y_train": y_tr.astype(np.int64), "x_test": x_te, "y_test": y_te.astype(np.int64),
        "classes": np.array(classes),
    }


def generate_pretrain(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A pretraining corpus mixing every generator; the label is (task, class), so the backbone learns all five.

    Stored as JPEG bytes like ``pretrain_cifar10.npz``. The images come from their own random stream, distinct
    from every task's train and test images.
    """
    names = list(SYNTHETIC_TASKS)
    per = [n // len(names) + (i < n % len(names)) for i in range(len(names))]
    images, labels, classes = [], [], []
    for name, k in zip(names, per, strict=True):
        gen, cls = SYNTHETIC_TASKS[name]
        x, y = gen(_task_seed(name, "pretrain", seed), k)
        images.append(_as_rgb(x))
        labels.append(y + len(classes))
        classes += [f"{name.removeprefix('syn_')}:{c}" for c in cls]
    x_all, y_all = np.concatenate(images), np.concatenate(labels)
    order = np.random.default_rng(seed).permutation(len(y_all))
    blobs, offsets = [], [0]
    for i in order:
        buf = io.BytesIO()
        Image.fromarray(x_all[i]).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        offsets.append(offsets[-1] + len(blobs[-1]))
    return {
        "jpeg": np.concatenate(blobs), "offsets": np.array(offsets, np.int64),
        "y": y_all[order].astype(np.int64), "classes": np.array(classes),
    }


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_suite(
    cache_dir: str | os.PathLike | None = None,
    *,
    tasks: list[str] | None = None,
    n_train: int = 2000,
    n_test: int = 500,
    n_pretrain: int = 10000,
    seed: int = 0,
) -> Path:
    """Write (or reuse) the synthetic suite in ``cache_dir``; returns the directory, usable as a data folder.

    A manifest records the generator version and sizes; files are regenerated only when they are missing or were
    written with other parameters. Every file is written atomically, so an interrupted run leaves no torn file.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    names = list(SYNTHETIC_TASKS) if tasks is None else tasks
    for t in names:
        if t not in SYNTHETIC_TASKS:
            raise QvecError(f"unknown synthetic task {t!r}; known: {', '.join(SYNTHETIC_TASKS)}")
    if min(n_train, n_test, n_pretrain) < 1:
        raise QvecError("synthetic suite sizes must be positive")
    params = {"version": GENERATOR_VERSION, "n_train": n_train, "n_test": n_test, "n_pretrain": n_pretrain,
              "seed": seed}
    manifest_path = root / _MANIFEST
    try:
        old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except ValueError:
        old = {}
    fresh = old.get("params") == params
    make_folder(root)
    for t in names:
        path = root / f"{t}.npz"
        if not (fresh and path.is_file()):
            _save_npz(path, generate_task(t, n_train, n_test, seed))
    pre = root / PRETRAIN_FILE
    if not (fresh and pre.is_file()):
        _save_npz(pre, generate_pretrain(n_pretrain, seed))
    manifest = {"params": params, "tasks": sorted(set(names) | set(old.get("tasks", [])) if fresh else names),
                "pretrain": PRETRAIN_FILE, "note": "procedurally generated by qvec.synthetic; not real data"}
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))
    return root
