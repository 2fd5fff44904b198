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

The schema version is ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`): an older database is migrated in place on
open (:data:`MIGRATIONS`, then any column a dataclass has and its table lacks), a newer one is refused. See
docs/formats.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from qvec import __version__
from qvec.core.atomic import check_output
from qvec.core.checkpoint import atomic_path, require_file
from qvec.core.errors import QvecError

#: The database schema this code writes, kept in ``PRAGMA user_version``. An older database is migrated on open,
#: step by step (:data:`MIGRATIONS`); a newer one is refused.
SCHEMA_VERSION = 3

#: What the ``meta`` table's ``schema`` row holds: the oldest schema whose code may write this database. qvec from
#: before ``user_version`` accepted only ``schema = 1``; migration 1 -> 2 only adds, so that stays 1 and such a qvec
#: can still read and write a migrated database. A migration that older code would misread raises it.
COMPAT_VERSION = 1

#: Result kinds. ``patched`` is PTQ(theta_FT^R + lam * tau_D); ``score`` a label-free score of it (split: the
#: signal, metric: the measure; see :mod:`qvec.rules`); the others are the per-receiver baselines.
KINDS = ("ft", "ft_ptq", "qat_ptq", "pretrained", "pretrained_ptq", "patched", "score")
#: ``<quantizer>:<kind>`` rows are the same measurement with another quantizer in place of RTN (``gptq:patched``,
#: or a registered quantizer's, e.g. ``toy:ft_ptq``); ``<quantizer>`` is a lowercase identifier.
QUANTIZER_KINDS = ("ft_ptq", "qat_ptq", "patched")
_QUANTIZER_KIND = re.compile(rf"[a-z][a-z0-9_]*:({'|'.join(QUANTIZER_KINDS)})")


def valid_kind(kind: str) -> bool:
    """Whether ``kind`` is one of :data:`KINDS` or ``<quantizer>:<kind>`` with a kind of :data:`QUANTIZER_KINDS`."""
    return kind in KINDS or _QUANTIZER_KIND.fullmatch(kind) is not None


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
    #: the study pipeline (deploy quantizer) the row measures ("" for float rows and rows from before pipelines)
    pipeline: str = ""
    #: the vector's coverage, all or quantized ("" for rows without a vector and rows from before coverages)
    coverage: str = ""
    #: stored bits per quantized weight of the quantizer (codes, scales, zero points); None in float
    bits_per_weight: float | None = None


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
    #: the grid a QAT run trained on (``w3-asym-group64``); "" for FT and pretraining
    grid: str = ""


_TRAINING_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Training))


def _sql_type(f) -> str:
    return _SQL_TYPES.get(str(f.type), "TEXT")


def _create_sql(table: str, cls, primary: str | None) -> str:
    cols = [f"{f.name} {_sql_type(f)}{' PRIMARY KEY' if f.name == primary else ''}" for f in fields(cls)]
    return f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(cols)})"


def _sql_default(f) -> str:
    """The DEFAULT clause of a column added to an existing table: the field's plain default, so the rows already
    there read back as a row made without that field would. NULL for a None default or a ``default_factory``."""
    v = f.default
    if v is MISSING or v is None:
        return ""
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, int) or (isinstance(v, float) and math.isfinite(v)):
        return f" DEFAULT {v!r}"
    if isinstance(v, str):
        return " DEFAULT '" + v.replace("'", "''") + "'"
    return ""


#: The tables that hold one dataclass each: their columns follow the dataclass's fields.
_DATACLASS_TABLES = (("results", Result), ("jobs", JobRecord), ("trainings", Training))


def add_missing_columns(conn: sqlite3.Connection) -> list[str]:
    """Inside a transaction: add every field of :class:`Result`, :class:`JobRecord` and :class:`Training` that its
    existing table lacks (``ALTER TABLE ... ADD COLUMN`` with the field's default). Returns ``table.column`` added.
    Tables not there yet are left to their ``CREATE TABLE``."""
    added = []
    for table, cls in _DATACLASS_TABLES:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if not have:
            continue
        for f in fields(cls):
            if f.name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {f.name} {_sql_type(f)}{_sql_default(f)}")
                added.append(f"{table}.{f.name}")
    return added


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """Schema 2 keeps its version in ``PRAGMA user_version`` (schema 1 had only the ``meta`` row) and has every
    column of the dataclasses: a database made before a field was added gets it, with the field's default."""
    add_missing_columns(conn)


#: ``MIGRATIONS[n]`` turns a schema-``n`` database into a schema ``n + 1`` one (run inside the open transaction,
#: which then sets ``user_version`` to ``n + 1``).
def _v2_to_v3(conn: sqlite3.Connection) -> None:
    """Schema 3 records each row's pipeline, vector coverage and bits per weight, and each QAT run's grid: the
    columns are added with their defaults ("" and NULL), which read as the single RTN pipeline of before."""
    add_missing_columns(conn)


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3}


def _stored_version(conn: sqlite3.Connection, path: Path) -> int:
    """The schema of an open database: ``user_version``; for a database from before that, its ``meta`` row
    (always 1), or 1 when it has qvec's tables without one; 0 for a new, empty file."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version:
        return version
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
        if row is not None:
            try:
                return int(row[0])
            except (TypeError, ValueError):
                raise QvecError(f"{path}: meta row 'schema' is {row[0]!r}, expected an integer") from None
    return 1 if tables & {"results", "jobs", "studies", "study_results", "trainings"} else 0


def _newer_error(path: Path, version: int) -> QvecError:
    return QvecError(f"{path}: results database schema {version} is newer than this qvec's ({SCHEMA_VERSION}); "
                     "upgrade qvec to open it")


class ResultStore:
    """An SQLite results database (WAL mode). Open one per process; only the grid driver writes to it."""

    def __init__(self, path: str | os.PathLike, create: bool = True) -> None:
        """Open (``create``: or make) a results database. Readers (report, export, plan) pass ``create=False``:
        a missing file, an empty one or another SQLite file is then an error and is left untouched. A database of
        an older schema is migrated in place (:data:`MIGRATIONS`); one of a newer schema is refused."""
        self.path = Path(path)
        if not create:
            require_file(self.path, "results database")  # a directory, FIFO or device is named as such
            if self.path.stat().st_size == 0:
                raise QvecError(f"{self.path}: empty file, not a results database")
        else:
            check_output(self.path)  # the output policy: a regular file or a new one
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            if not create and self.conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone() is None:
                self.conn.close()
                raise QvecError(f"{self.path}: an SQLite file without qvec results")
            version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:  # before anything is written (the journal mode included)
                self.conn.close()
                raise _newer_error(self.path, version)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process kills
            self._init_schema()
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            raise QvecError(f"{self.path}: not a usable results database ({e})") from None
        except OSError as e:
            raise QvecError(f"{self.path}: cannot open the results database ({e.strerror})") from None
        except QvecError:
            self._close_quietly()
            raise

    def _close_quietly(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()

    def _init_schema(self) -> None:
        """In one transaction: migrate an older database step by step, create what is missing, record the
        version. Two processes opening one old database migrate it once (the second sees the new version)."""
        with self.transaction():
            version = _stored_version(self.conn, self.path)
            if version > SCHEMA_VERSION:
                raise _newer_error(self.path, version)
            if version:  # an existing database: each step from its schema to this one (a new one starts current)
                for v in range(version, SCHEMA_VERSION):
                    if v not in MIGRATIONS:
                        raise QvecError(f"{self.path}: results database schema {v}: no migration to {v + 1} "
                                        f"(this qvec migrates schemas {min(MIGRATIONS)} to {SCHEMA_VERSION})")
                    MIGRATIONS[v](self.conn)
                    self.conn.execute(f"PRAGMA user_version = {v + 1}")
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(COMPAT_VERSION),))
            self.conn.execute(_create_sql("results", Result, "key"))
            self.conn.execute(_create_sql("jobs", JobRecord, None))
            self.conn.execute("CREATE TABLE IF NOT EXISTS study_results "
                              "(study TEXT, result_key TEXT, PRIMARY KEY (study, result_key))")
            self.conn.execute("CREATE TABLE IF NOT EXISTS trainings (study TEXT, key TEXT, kind TEXT, task TEXT, "
                              "bits INTEGER, seed INTEGER, seconds REAL, PRIMARY KEY (study, key))")
            self.conn.execute("CREATE TABLE IF NOT EXISTS studies (name TEXT PRIMARY KEY, config TEXT, updated REAL)")
            add_missing_columns(self.conn)  # a field added with a default needs no migration of its own
            if version != SCHEMA_VERSION:
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        """The schema of the open database (``PRAGMA user_version``)."""
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

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
        bad = next((r for r in results if not valid_kind(r.kind)), None)
        if bad is not None:
            raise QvecError(f"result {bad.key}: kind {bad.kind!r} is not one of {', '.join(KINDS)} or "
                            f"<quantizer>:{{{'|'.join(QUANTIZER_KINDS)}}}")
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
