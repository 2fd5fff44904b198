"""Probe sets: unlabeled images on which a patched, quantized model is compared with the receiver's FT model.

A probe is a file or folder of images that are *not* the receiver's (generic images: for the small ViTs the
pretraining corpus ``pretrain_cifar10.npz``, for real models any image folder), the receiver's own unlabeled
inputs, or generated noise. No labels are read, ever. Images are kept as uint8 at their stored size and resized
and normalised for a model by :meth:`ProbeSet.tensors`, as the task splits are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qvec.core.atomic import note_input
from qvec.core.errors import QvecError
from qvec.core.limits import check_count, check_fits
from qvec.data.files import decode_rgb, npz_array, open_npz
from qvec.data.tasks import load_jpeg_corpus, normalize, resize_batch

NOISE = "noise"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
#: Images smaller than this carry no content a ViT can read; such a probe is refused rather than upsampled.
MIN_PROBE_SIDE = 8
#: Side that images from a folder of mixed sizes are brought to (shorter side, then centre crop) when loaded.
FOLDER_SIDE = 224


@dataclass
class ProbeSet:
    """``n`` unlabeled images (uint8, N x 3 x H x W) and a name saying where they came from."""

    name: str
    images: torch.Tensor
    kind: str = "generic"
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tensors(self, config) -> torch.Tensor:
        """The images preprocessed for a model's :class:`qvec.models.DataConfig` (computed once, cached)."""
        key = (config.image_size, tuple(config.mean), tuple(config.std), config.interpolation)
        if key not in self._cache:
            check_fits(4 * len(self) * 3 * config.image_size ** 2,
                       f"{self.name}: {len(self):,} images preprocessed to 3x{config.image_size}x{config.image_size} "
                       "floats", "use fewer images (--probe-size, --calib-size)")
            out = []
            for s in range(0, len(self), 512):
                x = self.images[s : s + 512].float().div_(255.0)
                out.append(normalize(resize_batch(x, config.image_size, config.interpolation), config.mean,
                                     config.std))
            self._cache[key] = torch.cat(out) if out else torch.empty(0, 3, config.image_size, config.image_size)
        return self._cache[key]


def _check_images(x: torch.Tensor, where: str) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise QvecError(f"{where}: expected images of shape (N, H, W, 1|3), got {tuple(x.shape)}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if min(h, w) < MIN_PROBE_SIDE:
        raise QvecError(f"{where}: probe images are {h}x{w}; a probe needs images of at least "
                        f"{MIN_PROBE_SIDE}x{MIN_PROBE_SIDE}")
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _subset(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` images drawn without replacement by a seeded permutation (all of them when there are fewer)."""
    if n >= len(x):
        return x
    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
    return x.index_select(0, torch.from_numpy(idx))


def noise_probe(n: int, size: int = 32, seed: int = 0) -> ProbeSet:
    """Uniform noise images (what ``--probe noise`` means): a probe that needs no data at all."""
    check_count(n, "the probe size (--probe-size)", 1, unit="images")
    check_count(size, "the noise image size", MIN_PROBE_SIDE, unit="pixels")
    check_fits(n * 3 * size * size, f"a noise probe of {n:,} images of 3x{size}x{size}",
               "ask for fewer images (--probe-size)")
    g = torch.Generator().manual_seed(seed)
    return ProbeSet(NOISE, torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), NOISE)


def _from_npz(path: Path) -> torch.Tensor:
    d = open_npz(path, "probe file")
    files = set(d.files)
    if {"jpeg", "offsets"} <= files:  # a pretraining corpus
        return load_jpeg_corpus(path).full_train.images  # type: ignore[attr-defined]
    for name in ("x_train", "x", "images"):
        if name in files:
            x = npz_array(d, name, path)
            if x.dtype != np.uint8 or x.ndim != 4:
                raise QvecError(f"{path}: array {name!r} must be uint8 images (N, H, W, 1|3), got {x.dtype} "
                                f"{x.shape}")
            return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    raise QvecError(f"{path}: no images in this .npz (expected 'jpeg'+'offsets', 'x_train', 'x' or 'images')")


def _from_folder(path: Path, n: int, seed: int) -> torch.Tensor:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise QvecError(f"{path}: no images in this probe folder (looked for {', '.join(IMAGE_SUFFIXES)})")
    if n < len(files):
        files = [files[i] for i in np.sort(np.random.default_rng(seed).permutation(len(files))[:n])]
    check_fits(len(files) * 3 * FOLDER_SIDE ** 2, f"{path}: {len(files):,} probe images at up to "
               f"{FOLDER_SIDE}x{FOLDER_SIDE}", "ask for fewer images (--probe-size)")
    out = []
    for f in files:
        note_input(f)
        a = decode_rgb(f)
        x = _check_images(torch.from_numpy(a.copy()).permute(2, 0, 1)[None], str(f))
        out.append(_resized_uint8(x, min(FOLDER_SIDE, *x.shape[-2:])))
    side = min(int(x.shape[-1]) for x in out)
    return torch.cat([_resized_uint8(x, side) if x.shape[-1] != side else x for x in out])


def _resized_uint8(x: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 images resized to ``side`` x ``side``, through [0, 1] floats (the range resize_batch clamps to)."""
    return resize_batch(x.float().div_(255.0), side).mul_(255.0).round_().to(torch.uint8)


def load_probe(source: str | Path | ProbeSet, n: int = 1000, *, seed: int = 0, noise_size: int = 32) -> ProbeSet:
    """A probe from ``noise``, an ``.npz`` (pretraining corpus, task file or an ``x``/``images`` array) or an image
    folder; ``n`` images drawn by a seeded permutation. Every problem is one :class:`QvecError` naming the path."""
    if isinstance(source, ProbeSet):
        return source
    check_count(n, "the probe size (--probe-size)", 1, unit="images")
    if str(source) == NOISE:
        return noise_probe(n, noise_size, seed)
    path = Path(source).expanduser()
    if path.is_dir():
        x = _from_folder(path, n, seed)
    elif path.is_file():
        if path.suffix != ".npz":
            raise QvecError(f"{path}: a probe is an image folder, an .npz file or 'noise'")
        x = _subset(_check_images(_from_npz(path), str(path)), n, seed)
    else:
        raise QvecError(f"{path}: no such probe file or folder (or use 'noise')")
    if len(x) == 0:
        raise QvecError(f"{path}: the probe has no images")
    return ProbeSet(path.name, x.contiguous())


def receiver_probe(task, n: int, split: str = "val") -> ProbeSet:
    """The receiver's own unlabeled inputs: the first ``n`` images of one of its splits, labels dropped."""
    ds = task.split(split)
    m = min(n, len(ds))
    if m == 0:
        raise QvecError(f"task {task.name!r} has no {split} images to use as unlabeled inputs")
    x = ds.load(range(m)).mul_(255.0).round_().to(torch.uint8)
    return ProbeSet(f"{task.name}:{split}", x, "receiver")
