"""The results database: one SQLite row per measured number, written so that a killed run loses nothing.

Why SQLite: it is in the standard library, a single file, and its write-ahead log makes every committed
transaction survive a ``kill -9`` of the writer. Each result row carries a content key (a hash of everything that
determines the number: upstream artifact keys, quantizer, lambda, split, evaluation settings, library version), so
inserting it again is a no-op (``INSERT OR IGNORE``) and a restarted run can ask "is this already measured?" per
row. Only the driver process writes; workers return rows to it.

A study (one grid configuration) does not own its rows: a row measured by one study is reused by another that
needs the same number. The ``study_results`` table records which rows belong to which study, so a report shows
exactly the study's grid (for instance lambda* is chosen over that study's lambda grid, not over every lambda
some other study measured).
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .. import __version__
from ..errors import QvecError

SCHEMA_VERSION = 1

#: Result kinds. ``patched`` is PTQ(theta_FT^R + lam * tau_D); ``score`` a label-free score of it (split: the
#: signal, metric: the measure; see :mod:`qvec.rules`); the others are the per-receiver baselines.
#: ``gptq:<kind>`` rows are the same measurement with GPTQ in place of RTN.
KINDS = ("ft", "ft_ptq", "qat_ptq", "pretrained", "pretrained_ptq", "patched", "score", "gptq:ft_ptq",
         "gptq:qat_ptq", "gptq:patched")


@dataclass
class Result:
    """One measured number (top-1 accuracy in 0..1 of one model on one split)."""

    key: str
    kind: str
    model: str
    backbone: str
    receiver: str
    split: str
    value: float
    correct: int
    n: int
    donor: str = ""
    bits: int | None = None
    quant: str = ""
    lam: float | None = None
    seed: int = 0
    metric: str = "top1"
    eval_seconds: float = 0.0
    patch_seconds: float = 0.0
    ptq_seconds: float = 0.0
    worker: str = ""
    inputs: str = "{}"
    version: str = __version__
    created: float = field(default_factory=time.time)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Result))
_SQL_TYPES = {"float": "REAL", "int": "INTEGER", "str": "TEXT", "int | None": "INTEGER", "float | None": "REAL"}


@dataclass
class JobRecord:
    """One finished execution of a job (training, vector extraction, evaluation batch) and what it cost.

    The table is an append-only log, not a set: a job that ran twice shows up twice, which is how the tests check
    that a restarted run repeats no finished job.
    """

    key: str
    kind: str
    label: str
    study: str = ""
    task: str = ""
    bits: int | None = None
    seconds: float = 0.0
    results: int = 0
    worker: str = ""
    version: str = __version__
    finished: float = field(default_factory=time.time)


_JOB_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(JobRecord))


@dataclass
class Training:
    """A training artifact a study uses, with its training time (the QAT cost in the report's cost table)."""

    study: str
    key: str
    kind: str
    task: str
    bits: int | None
    seed: int
    seconds: float


_TRAINING_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Training))


def _create_sql(table: str, cls, primary: str | None) -> str:
    cols = []
    for f in fields(cls):
        sql_type = _SQL_TYPES.get(str(f.type), "TEXT")
        cols.append(f"{f.name} {sql_type}{' PRIMARY KEY' if f.name == primary else ''}")
    return f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(cols)})"


class ResultStore:
    """An SQLite results database (WAL mode). Open one per process; only the grid driver writes to it."""

    def __init__(self, path: str | os.PathLike, create: bool = True) -> None:
        """Open (``create``: or make) a results database. Readers (report, export, plan) pass ``create=False``:
        a missing file, an empty one or another SQLite file is then an error and is left untouched."""
        self.path = Path(path)
        if not create:
            if self.path.is_dir():
                raise QvecError(f"{self.path}: is a directory, not a results database")
            if not self.path.is_file():
                raise QvecError(f"{self.path}: no such results database")
            if self.path.stat().st_size == 0:
                raise QvecError(f"{self.path}: empty file, not a results database")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            if not create and self.conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone() is None:
                self.conn.close()
                raise QvecError(f"{self.path}: an SQLite file without qvec results")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process kills
            self._init_schema()
        except sqlite3.DatabaseError as e:
            raise QvecError(f"{self.path}: not a usable results database ({e})") from None
        except OSError as e:
            raise QvecError(f"{self.path}: cannot open the results database ({e.strerror})") from None

    def _init_schema(self) -> None:
        with self.transaction():
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            row = self.conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is not None and int(row[0]) != SCHEMA_VERSION:
                raise QvecError(f"{self.path}: results schema {row[0]}, this qvec writes {SCHEMA_VERSION}")
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self.conn.execute(_create_sql("results", Result, "key"))
            self.conn.execute(_create_sql("jobs", JobRecord, None))
            self.conn.execute("CREATE TABLE IF NOT EXISTS study_results "
                              "(study TEXT, result_key TEXT, PRIMARY KEY (study, result_key))")
            self.conn.execute("CREATE TABLE IF NOT EXISTS trainings (study TEXT, key TEXT, kind TEXT, task TEXT, "
                              "bits INTEGER, seed INTEGER, seconds REAL, PRIMARY KEY (study, key))")
            self.conn.execute("CREATE TABLE IF NOT EXISTS studies (name TEXT PRIMARY KEY, config TEXT, updated REAL)")

    def transaction(self):
        """``with store.transaction():`` one atomic write (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        return _Transaction(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- studies
    def register_study(self, name: str, config: dict) -> None:
        """Record ``name``'s configuration. A changed configuration empties the study's membership (its rows and
        trainings stay in the database for reuse): the run then links exactly what its new plan needs, so a report
        never mixes rows of an earlier configuration (another granularity, recipe or evaluation limit)."""
        text = json.dumps(config, sort_keys=True)
        with self.transaction():
            row = self.conn.execute("SELECT config FROM studies WHERE name=?", (name,)).fetchone()
            if row is not None and row[0] != text:
                self.conn.execute("DELETE FROM study_results WHERE study=?", (name,))
                self.conn.execute("DELETE FROM trainings WHERE study=?", (name,))
            self.conn.execute("INSERT OR REPLACE INTO studies VALUES (?, ?, ?)", (name, text, time.time()))

    def studies(self) -> list[str]:
        """Study names, most recently updated last."""
        return [r[0] for r in self.conn.execute("SELECT name FROM studies ORDER BY updated")]

    def study_config(self, name: str) -> dict:
        row = self.conn.execute("SELECT config FROM studies WHERE name=?", (name,)).fetchone()
        if row is None:
            raise QvecError(f"{self.path}: no study named {name!r}; studies: {', '.join(self.studies()) or 'none'}")
        return json.loads(row[0])

    def resolve_study(self, name: str | None) -> str:
        """``name``, or the most recently updated study when None."""
        names = self.studies()
        if not names:
            raise QvecError(f"{self.path}: the database holds no study yet (run 'qvec grid run' first)")
        if name is None:
            return names[-1]
        if name not in names:
            raise QvecError(f"{self.path}: no study named {name!r}; studies: {', '.join(names)}")
        return name

    # ------------------------------------------------------------------------------------------- results
    def _insert_results(self, results: Sequence[Result], study: str | None) -> int:
        """Inside an open transaction: insert rows (a key already present is left as is); returns new rows."""
        if not results:
            return 0
        before = self.conn.total_changes
        self.conn.executemany(
            f"INSERT OR IGNORE INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [tuple(getattr(r, c) for c in COLUMNS) for r in results],
        )
        added = self.conn.total_changes - before
        if study is not None:
            links = [(study, r.key) for r in results]
            self.conn.executemany("INSERT OR IGNORE INTO study_results VALUES (?, ?)", links)
        return added

    def add_results(self, results: Sequence[Result], study: str | None = None) -> int:
        """Insert rows idempotently in one transaction; returns how many were new."""
        with self.transaction():
            return self._insert_results(results, study)

    def link_results(self, study: str, keys: Iterable[str]) -> None:
        """Make already stored rows part of ``study`` (rows measured by another study, reused)."""
        with self.transaction():
            self.conn.executemany("INSERT OR IGNORE INTO study_results VALUES (?, ?)", [(study, k) for k in keys])

    def existing(self, keys: Iterable[str]) -> dict[str, Result]:
        """The stored rows among ``keys``."""
        keys = list(keys)
        out: dict[str, Result] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT * FROM results WHERE key IN ({', '.join('?' * len(chunk))})"
            for row in self.conn.execute(q, chunk):
                out[row["key"]] = _row_to_result(row)
        return out

    def results(self, study: str | None = None) -> list[Result]:
        """Every row, or those of one study, in a stable order."""
        order = "ORDER BY r.kind, r.bits, r.receiver, r.donor, r.lam, r.split, r.seed"
        if study is None:
            rows = self.conn.execute(f"SELECT * FROM results r {order}")
        else:
            rows = self.conn.execute(
                f"SELECT r.* FROM results r JOIN study_results s ON s.result_key = r.key WHERE s.study = ? {order}",
                (study,),
            )
        return [_row_to_result(r) for r in rows]

    def count(self, study: str | None = None) -> int:
        if study is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        return int(self.conn.execute("SELECT COUNT(*) FROM study_results WHERE study=?", (study,)).fetchone()[0])

    # ---------------------------------------------------------------------------------------------- jobs
    def add_job(self, job: JobRecord, results: Sequence[Result] = (), study: str | None = None) -> int:
        """Log a finished execution together with the rows it produced, in one transaction; returns new rows.

        One transaction for both is what makes a kill harmless: either the job and all its rows are recorded,
        or neither is and the restarted run simply runs the job again.
        """
        with self.transaction():
            added = self._insert_results(results, study)
            self.conn.execute(
                f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) VALUES ({', '.join('?' * len(_JOB_COLUMNS))})",
                tuple(getattr(job, c) for c in _JOB_COLUMNS),
            )
        return added

    def jobs(self, study: str | None = None) -> list[JobRecord]:
        """The execution log (all studies, or one), oldest first."""
        if study is None:
            rows = self.conn.execute("SELECT * FROM jobs ORDER BY rowid")
        else:
            rows = self.conn.execute("SELECT * FROM jobs WHERE study = ? ORDER BY rowid", (study,))
        return [JobRecord(**{c: r[c] for c in _JOB_COLUMNS}) for r in rows]

    def add_trainings(self, trainings: Sequence[Training]) -> None:
        """Record (or refresh) the training artifacts a study uses and their training time."""
        with self.transaction():
            self.conn.executemany(
                f"INSERT OR REPLACE INTO trainings ({', '.join(_TRAINING_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_TRAINING_COLUMNS))})",
                [tuple(getattr(t, c) for c in _TRAINING_COLUMNS) for t in trainings],
            )

    def trainings(self, study: str) -> list[Training]:
        rows = self.conn.execute("SELECT * FROM trainings WHERE study = ? ORDER BY kind, task, bits", (study,))
        return [Training(**{c: r[c] for c in _TRAINING_COLUMNS}) for r in rows]

    # -------------------------------------------------------------------------------------------- export
    def export_csv(self, path: str | os.PathLike, study: str | None = None) -> Path:
        """All result columns as CSV (one row per result), written atomically."""
        from ..checkpoint import atomic_path

        rows = self.results(study)
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for r in rows:
                w.writerow([getattr(r, c) if getattr(r, c) is not None else "" for c in COLUMNS])
        return path

    def export_parquet(self, path: str | os.PathLike, study: str | None = None) -> Path:
        """All result columns as a Parquet table (needs pyarrow: ``pip install 'qvec[parquet]'``)."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise QvecError("Parquet export needs pyarrow: pip install 'qvec[parquet]'") from None
        from ..checkpoint import atomic_path

        rows = self.results(study)
        types = {"float": pa.float64(), "int": pa.int64(), "str": pa.string(),
                 "int | None": pa.int64(), "float | None": pa.float64()}
        schema = pa.schema([(f.name, types[str(f.type)]) for f in fields(Result)])
        table = pa.Table.from_pylist([asdict(r) for r in rows], schema=schema)
        path = Path(path)
        with atomic_path(path) as tmp:
            pq.write_table(table, str(tmp))
        return path


def _row_to_result(row: sqlite3.Row) -> Result:
    return Result(**{c: row[c] for c in COLUMNS})


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
