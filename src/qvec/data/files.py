"""Opening data files that a user hands over, without trusting them: ``.npz`` archives and images.

Every reader of user data goes through here (task files, the pretraining corpus, probe and calibration images,
Hugging Face images), so the checks hold for every command:

* an ``.npz`` is a zip of ``.npy`` arrays. One of dtype ``object`` is a pickle, which qvec never loads
  (unpickling runs code); it is refused in one line, as is an archive whose arrays would need more memory than
  the machine has (each array's header declares its shape, read before any data), or one that is not a readable
  zip of arrays at all;
* an image is opened lazily (its header gives its size) and refused in one line when it has more than
  :func:`max_image_pixels` pixels (default :data:`DEFAULT_MAX_IMAGE_PIXELS`, raised or lowered with
  ``$QVEC_MAX_IMAGE_PIXELS``), before it is decoded: a PNG of a few KB can decode to gigabytes (a decompression
  bomb).
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile

import numpy as np

from qvec.core.checkpoint import require_file
from qvec.core.errors import QvecError
from qvec.core.limits import check_fits

PIXELS_ENV = "QVEC_MAX_IMAGE_PIXELS"
#: 50 megapixels: more than an 8K frame (33 MP) or a 48 MP phone photo; decoded as RGB it is 150 MB.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _member_header(zf: zipfile.ZipFile, member: str) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape an ``.npy`` member declares, read from its header (no data is decoded)."""
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return dtype, shape


def open_npz(path: str | os.PathLike, what: str = ".npz file"):
    """An ``.npz`` opened for reading (numpy's lazy ``NpzFile``: ``.files``, ``[name]``), after checking every
    array's header: no object arrays (pickles), and no more bytes in all than the memory available."""
    path = require_file(path, what)
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                dtype, shape = _member_header(zf, member)
                name = member[: -len(".npy")]
                if dtype.hasobject:
                    raise QvecError(f"{path}: array {name!r} holds Python objects (dtype object, a pickle); qvec "
                                    "loads only plain numeric arrays and never unpickles (save it with a numeric "
                                    "or string dtype)")
                total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    except QvecError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise QvecError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
    check_fits(total, f"{path}: its arrays ({total:,} bytes once loaded)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise QvecError(f"{path}: not a readable .npz file ({_first_line(e)})") from None


def npz_array(d, name: str, path: str | os.PathLike) -> np.ndarray:
    """One array of an open ``.npz``; a member that cannot be decoded (corrupt, truncated) is one line."""
    try:
        return d[name]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise QvecError(f"{path}: array {name!r} cannot be read ({_first_line(e)})") from None


def max_image_pixels() -> int:
    """The most pixels (width x height) an image may have: ``$QVEC_MAX_IMAGE_PIXELS``, else the default."""
    raw = os.environ.get(PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise QvecError(f"${PIXELS_ENV} must be a positive whole number of pixels, got {raw!r}")
    return value


def open_image(source: str | os.PathLike | bytes, where: str | None = None):
    """A PIL image, opened lazily and refused in one line when larger than :func:`max_image_pixels` or not a
    readable image. ``source`` is a path or the encoded bytes; ``where`` names it in messages."""
    from PIL import Image

    where = where or str(source if not isinstance(source, bytes | bytearray) else "image")
    limit = max_image_pixels()
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # qvec's own limit below applies, with its own message
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise QvecError(f"{where}: not a readable image ({_first_line(e)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
    w, h = im.size
    if w * h > limit:
        im.close()
        raise QvecError(f"{where}: image of {w}x{h} = {w * h:,} pixels is over the limit of {limit:,} (a "
                        f"decompression bomb?); raise it with {PIXELS_ENV}={w * h} if the image is genuine")
    return im


def decode_rgb(source: str | os.PathLike | bytes, where: str | None = None) -> np.ndarray:
    """An image as an H x W x 3 uint8 array, through :func:`open_image`'s checks."""
    im = open_image(source, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise QvecError(f"{where or source}: not a readable image ({_first_line(e)})") from None
    finally:
        im.close()
