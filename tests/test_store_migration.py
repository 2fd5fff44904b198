"""The results database's schema version (PRAGMA user_version) and its migrations: a database made by older qvec
opens, gains the columns it lacks with their defaults and keeps its rows; a newer one is refused in one line."""

from __future__ import annotations

import sqlite3
from dataclasses import fields

import pytest

from qvec.core.errors import QvecError
from qvec.grid import store as store_mod
from qvec.grid.store import COMPAT_VERSION, MIGRATIONS, SCHEMA_VERSION, JobRecord, Result, ResultStore, valid_kind

#: The tables as qvec's first results schema made them, less the columns added since (as a database of a qvec
#: from before those fields would be): ``results`` without ``metric``, ``ptq_seconds`` and ``worker``; ``jobs``
#: without ``worker``. No ``user_version``: schema 1 kept its version only in the ``meta`` row.
OLD_DDL = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT);
INSERT INTO meta VALUES ('schema', '1');
CREATE TABLE results (key TEXT PRIMARY KEY, kind TEXT, model TEXT, backbone TEXT, receiver TEXT, split TEXT,
    value REAL, correct INTEGER, n INTEGER, donor TEXT, bits INTEGER, quant TEXT, lam REAL, seed INTEGER,
    eval_seconds REAL, patch_seconds REAL, inputs TEXT, version TEXT, created REAL);
CREATE TABLE jobs (key TEXT, kind TEXT, label TEXT, study TEXT, task TEXT, bits INTEGER, seconds REAL,
    results INTEGER, version TEXT, finished REAL);
CREATE TABLE study_results (study TEXT, result_key TEXT, PRIMARY KEY (study, result_key));
CREATE TABLE trainings (study TEXT, key TEXT, kind TEXT, task TEXT, bits INTEGER, seed INTEGER, seconds REAL,
    PRIMARY KEY (study, key));
CREATE TABLE studies (name TEXT PRIMARY KEY, config TEXT, updated REAL);
INSERT INTO results VALUES ('r1', 'patched', 'qvec:vit-nano', 'b0', 'recv', 'test', 0.75, 3, 4, 'donor', 3,
    'w3', 0.5, 0, 0.01, 0.002, '{}', '0.0.9', 1700000000.0);
INSERT INTO results VALUES ('r2', 'ft', 'qvec:vit-nano', 'b0', 'recv', 'test', 0.9, 9, 10, '', NULL, '', NULL, 0,
    0.01, 0.0, '{}', '0.0.9', 1700000001.0);
INSERT INTO study_results VALUES ('s', 'r1'), ('s', 'r2');
INSERT INTO jobs VALUES ('k1', 'cells', 'cells w3 donor -> recv', 's', 'recv', 3, 1.5, 1, '0.0.9', 1700000002.0);
INSERT INTO studies VALUES ('s', '{}', 1700000003.0);
"""


def _old_db(path) -> None:
    conn = sqlite3.connect(str(path))
    conn.executescript(OLD_DDL)
    conn.commit()
    conn.close()


def _raw(path, sql: str):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _columns(path, table: str) -> list[str]:
    return [r[1] for r in _raw(path, f"PRAGMA table_info({table})")]


def _row(key: str, kind: str = "patched") -> Result:
    return Result(key=key, kind=kind, model="qvec:vit-nano", backbone="b0", receiver="recv", split="test",
                  value=0.5, correct=1, n=2, donor="donor", bits=3, quant="w3", lam=1.0)


def test_old_database_is_migrated_in_place(tmp_path):
    db = tmp_path / "old.db"
    _old_db(db)
    assert _raw(db, "PRAGMA user_version") == [(0,)]
    with ResultStore(db, create=False) as st:
        assert st.schema_version() == SCHEMA_VERSION
        rows = {r.key: r for r in st.results("s")}
        assert set(rows) == {"r1", "r2"} and st.count() == 2
        r1 = rows["r1"]
        assert (r1.value, r1.correct, r1.n, r1.lam, r1.donor, r1.version) == (0.75, 3, 4, 0.5, "donor", "0.0.9")
        assert (r1.metric, r1.ptq_seconds, r1.worker) == ("top1", 0.0, "")  # the added columns' defaults
        assert rows["r2"].lam is None and rows["r2"].bits is None
        [job] = st.jobs("s")
        assert (job.key, job.worker, job.seconds) == ("k1", "", 1.5)
        # the migrated database takes new rows with every column
        assert st.add_results([_row("r3")], "s") == 1
        assert st.existing(["r3"])["r3"].metric == "top1"
    assert set(_columns(db, "results")) == {f.name for f in fields(Result)}
    assert set(_columns(db, "jobs")) == {f.name for f in fields(JobRecord)}
    assert _raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert _raw(db, "SELECT value FROM meta WHERE name='schema'") == [(str(COMPAT_VERSION),)]
    with ResultStore(db) as st:  # opening again changes nothing
        assert st.count() == 3 and st.schema_version() == SCHEMA_VERSION


def test_migrated_database_still_opens_for_the_schema_1_check(tmp_path):
    """qvec before user_version refused any database whose meta row was not 1: migration 1 -> 2 only adds, so
    it keeps that row, and such a qvec can still use the database."""
    db = tmp_path / "old.db"
    _old_db(db)
    ResultStore(db).close()
    assert _raw(db, "SELECT value FROM meta WHERE name='schema'") == [("1",)]


def test_new_database_records_its_version(tmp_path):
    db = tmp_path / "new.db"
    with ResultStore(db) as st:
        assert st.schema_version() == SCHEMA_VERSION
    assert _raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert set(_columns(db, "results")) == {f.name for f in fields(Result)}


def test_newer_database_is_refused_in_one_line(tmp_path):
    db = tmp_path / "newer.db"
    ResultStore(db).close()
    conn = sqlite3.connect(str(db))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    for create in (True, False):
        with pytest.raises(QvecError) as e:
            ResultStore(db, create=create)
        text = str(e.value)
        assert "\n" not in text and str(db) in text
        assert f"schema {SCHEMA_VERSION + 1}" in text and f"({SCHEMA_VERSION})" in text
    assert _raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]  # left as it was


def test_failed_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    db = tmp_path / "old.db"
    _old_db(db)

    def broken(conn):
        store_mod.add_missing_columns(conn)
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setitem(MIGRATIONS, 1, broken)
    with pytest.raises(QvecError, match="not a usable results database"):
        ResultStore(db)
    assert _raw(db, "PRAGMA user_version") == [(0,)]
    assert "metric" not in _columns(db, "results")  # the ALTER TABLE was rolled back with the rest
    monkeypatch.undo()
    with ResultStore(db) as st:
        assert st.count() == 2 and st.schema_version() == SCHEMA_VERSION


def test_every_older_schema_has_a_migration():
    assert set(MIGRATIONS) == set(range(1, SCHEMA_VERSION))


def test_malformed_legacy_version(tmp_path):
    db = tmp_path / "odd.db"
    _old_db(db)
    conn = sqlite3.connect(str(db))
    conn.execute("UPDATE meta SET value='one' WHERE name='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(QvecError, match=r"meta row 'schema' is 'one', expected an integer"):
        ResultStore(db)


@pytest.mark.parametrize("kind", ["ft", "ft_ptq", "qat_ptq", "pretrained", "pretrained_ptq", "patched", "score",
                                  "gptq:ft_ptq", "gptq:qat_ptq", "gptq:patched", "toy:patched", "my_q2:ft_ptq"])
def test_valid_kinds(kind):
    assert valid_kind(kind)


@pytest.mark.parametrize("kind", ["", "bogus", "Toy:patched", "toy:score", "toy:", ":patched", "a-b:patched",
                                  "2q:patched", "toy:patched:x", "gptq:ft"])
def test_invalid_kinds(kind):
    assert not valid_kind(kind)


def test_store_accepts_any_quantizers_kind_and_refuses_others(tmp_path):
    with ResultStore(tmp_path / "k.db") as st:
        assert st.add_results([_row("a", "toy:patched"), _row("b", "gptq:qat_ptq")], "s") == 2
        with pytest.raises(QvecError) as e:
            st.add_results([_row("c"), _row("d", "toy:score")], "s")
        assert "\n" not in str(e.value) and "result d: kind 'toy:score'" in str(e.value)
        assert st.count() == 2  # nothing of the refused batch was written
