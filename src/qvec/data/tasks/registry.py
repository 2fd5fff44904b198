"""``get_task``: the one entry point from a task name to a loaded :class:`~qvec.tasks.splits.Task`.

It joins the two halves of the package: :func:`~qvec.tasks.catalogue.locate_task` says where a name lives (a
``.npz`` file of the data folder, or Hugging Face) and :mod:`qvec.tasks.loaders` reads it, once per process, under
a key that changes when the file does. A module of its own so that neither the catalogue nor the loaders depends
on the other's job.
"""

from __future__ import annotations

import os
from pathlib import Path

from qvec.core.errors import QvecError
from qvec.data.tasks.catalogue import (
    DATA_ENV,
    HF_ROOT_ENV,
    PAPER_TASKS,
    local_task_files,
    locate_task,
    paper_task,
    resolve_data_dir,
)
from qvec.data.tasks.loaders import cached, load_hf_task, load_npz_task
from qvec.data.tasks.splits import Task


def get_task(name: str, data_dir: str | Path | None = None, *, hf_root: str | Path | None = None) -> Task:
    """A task by name, loaded once per process.

    ``name`` is a local file stem (``mnist``), a paper task by its SPEC name (``MNIST``, ``Cars``: the local file
    when the data folder has it, else Hugging Face), or ``hf:<paper task | dataset id | saved folder>`` to force
    Hugging Face (see :func:`~qvec.tasks.catalogue.locate_task`). An unknown name is an error with the ``hf:``
    spelling as a hint. ``hf_root`` defaults to ``$QVEC_HF_ROOT``.
    """
    hf_root = hf_root if hf_root is not None else os.environ.get(HF_ROOT_ENV) or None
    if name.startswith("hf:"):
        return cached(("hf", name[3:], str(hf_root)), lambda: load_hf_task(name[3:], hf_root))
    d = resolve_data_dir(data_dir)
    local = local_task_files(d)
    where = locate_task(name, d, local)
    if isinstance(where, Path):
        stat = where.stat()
        return cached(("npz", str(where.resolve()), stat.st_mtime_ns, stat.st_size), lambda: load_npz_task(where))
    pt = paper_task(name)
    if where == "hf" and pt is not None:
        return cached(("hf", pt.name, str(hf_root)), lambda: load_hf_task(name, hf_root))
    if d is not None:
        hint = f"; use hf:{pt.name} to load it from Hugging Face" if pt else ""
        raise QvecError(f"{d}: no task {name!r} (has: {', '.join(local) or 'none'}){hint}")
    raise QvecError(f"unknown task {name!r}; known: {', '.join(PAPER_TASKS)} (or set --data / ${DATA_ENV})")
