"""Layer 6, studies: donor x receiver grids: configuration, job graph, artifacts, results database, executors,
reports. A study schedules and stores calls of :mod:`qvec.vectors.measure` and the training functions; it computes
nothing of its own.

May import: every layer below it (core, data, models, quant, train, vectors).

``run_grid(load_config(path), db=..., artifacts=...)`` runs (or resumes) a whole study; ``write_report(db, out)``
turns its database into the paper's tables and figures. See docs/grid.md.

Names are imported lazily, so that a worker process can import :mod:`qvec.grid.workerinit` without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DEFAULT_LAMBDAS": "config",
    "GridConfig": "config",
    "load_config": "config",
    "Plan": "plan",
    "build_plan": "plan",
    "describe_plan": "plan",
    "RunSummary": "run",
    "default_paths": "run",
    "job_status": "run",
    "run_grid": "run",
    "Result": "store",
    "ResultStore": "store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
