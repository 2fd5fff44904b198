"""Shared by the hostile-input tests: run the real ``qvec`` entry point in a subprocess, and check that a refusal is
exactly one line, exit status 2, and that nothing changed on disk (no input, device node or FIFO touched, no output
or temporary file left)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import qvec

SRC = Path(qvec.__file__).resolve().parents[1]
#: A fixed memory figure, so that messages quoting "the ... available" are exact on any machine.
MEMORY = "4G"


def qvec_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "QVEC_PLUGINS", "QVEC_DATA")}
    env.update(PYTHONPATH=str(SRC), QVEC_MEMORY_LIMIT=MEMORY, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def qvec_run(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m qvec ARGS`` with this checkout's package, output captured (a pipe: not a terminal)."""
    return subprocess.run([sys.executable, "-m", "qvec", *map(str, args)], cwd=cwd, env=env or qvec_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots`` (hidden ones included): its kind and, for a file, its size, mtime and hash; for
    a link, its target; for a device node, its device number."""
    out: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    out[str(p)] = ("link", os.readlink(p))
                elif stat.S_ISREG(st.st_mode):
                    out[str(p)] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
                elif stat.S_ISDIR(st.st_mode):
                    out[str(p)] = ("dir",)
                elif stat.S_ISFIFO(st.st_mode):
                    out[str(p)] = ("fifo", st.st_ino)
                elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    out[str(p)] = ("device", st.st_rdev, st.st_ino)
                else:
                    out[str(p)] = ("other", st.st_mode)
    return out


def refused(message: str, *args, cwd: Path, roots: tuple[Path, ...], env: dict | None = None) -> None:
    """``qvec ARGS`` prints exactly ``error: MESSAGE`` (one line, nothing on stdout), exits 2, and leaves every entry
    under ``roots`` as it was."""
    before = snapshot(*roots)
    r = qvec_run(*args, cwd=cwd, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {message}\n"), (r.returncode, r.stdout, r.stderr)
    after = snapshot(*roots)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
