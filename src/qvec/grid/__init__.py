"""Donor x receiver experiment grids: configuration, job graph, artifacts, results database, executors, reports.

``run_grid(load_config(path), db=..., artifacts=...)`` runs (or resumes) a whole study; ``write_report(db, out)``
turns its database into the paper's tables and figures. See docs/grid.md.
"""

from .config import DEFAULT_LAMBDAS, GridConfig, load_config
from .plan import Plan, build_plan, describe_plan, select_lambda
from .run import RunSummary, default_paths, job_status, run_grid
from .store import Result, ResultStore

__all__ = [
    "DEFAULT_LAMBDAS",
    "GridConfig",
    "Plan",
    "Result",
    "ResultStore",
    "RunSummary",
    "build_plan",
    "default_paths",
    "describe_plan",
    "job_status",
    "load_config",
    "run_grid",
    "select_lambda",
]
