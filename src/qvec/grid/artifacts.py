"""A content-addressed artifact store: checkpoints and vectors named by a hash of everything that made them.

Why content addressing: a job's key is a hash of its inputs (the keys of the artifacts it consumes, the recipe,
the model spec, the quantizer, the data file's digest, the library version), so the same job in a second run, in
a widened grid or in another study maps to the same file and is not recomputed, while any change of input gives a
new key and never silently reuses a stale file. A finished artifact is a file that exists: every file is written
to a temporary name and renamed into place (``qvec.checkpoint.atomic_path``), so a run killed mid-write leaves no
torn artifact, and an interrupted training resumes from its own per-epoch state file beside the artifact.

Layout: ``<root>/<kind>/<key>.safetensors`` with ``<key>.json`` beside it (the inputs, for provenance).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qvec import __version__
from qvec.core.checkpoint import atomic_path
from qvec.core.errors import QvecError

#: Bumped when the meaning of a grid job changes without a library version change (keeps keys honest).
GRID_FORMAT = 1


def content_key(kind: str, inputs: dict) -> str:
    """The key of a job: sha256 over its kind, canonical-JSON inputs, the library version and the grid format."""
    payload = json.dumps({"kind": kind, "inputs": inputs, "version": __version__, "grid": GRID_FORMAT},
                         sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime): identifies a data file or a weights file."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise QvecError(f"{p}: no such file") from None
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[memo] = h.hexdigest()[:24]
    return _FILE_DIGESTS[memo]


class ArtifactStore:
    """Files under ``root`` addressed by (kind, key). Shared by every worker (a shared filesystem for Ray)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()

    def path(self, kind: str, key: str, suffix: str = ".safetensors") -> Path:
        return self.root / kind / f"{key}{suffix}"

    def exists(self, kind: str, key: str) -> bool:
        """True when the artifact is complete (atomic rename is the completion marker)."""
        return self.path(kind, key).is_file()

    def write_info(self, kind: str, key: str, info: dict) -> Path:
        """The inputs of an artifact as JSON beside it (provenance; written before the artifact itself)."""
        p = self.path(kind, key, ".json")
        with atomic_path(p) as tmp:
            tmp.write_text(json.dumps({"kind": kind, "key": key, "version": __version__, **info}, indent=1,
                                      sort_keys=True, default=str))
        return p

    def link_by_name(self, named: dict[str, Path], study: str) -> Path:
        """Readable links ``by-name/<study>/<name>.safetensors`` -> the content-addressed files (``ft-mnist``,
        ``qat-w2-mnist``, ``vector-w2-mnist``), so a person can find a study's models by task and kind (studies
        that share an artifact folder keep their own links)."""
        folder = self.root / "by-name" / study
        for name, target in named.items():
            if not target.is_file():
                continue
            link = folder / f"{name.replace('/', '-')}{target.suffix}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                if link.is_symlink() or link.exists():
                    if link.resolve() == target.resolve():
                        continue
                    link.unlink()
                link.symlink_to(os.path.relpath(target, folder))
            except OSError:
                return folder  # links are a convenience; a filesystem without them still has the files
        return folder

