"""The results database: idempotent rows, study membership, the execution log, WAL, CSV and Parquet export."""

from __future__ import annotations

import csv
import sqlite3

import pytest

from qvec.cli import main
from qvec.core.errors import QvecError
from qvec.grid.store import COLUMNS, JobRecord, Result, ResultStore, Training


def _row(key: str, value: float = 0.5, **kw) -> Result:
    base = dict(kind="patched", model="qvec:vit-nano", backbone="b0", receiver="r", split="test", value=value,
                correct=int(100 * value), n=100, donor="d", bits=3, quant="w3-sym-channel", lam=1.0)
    base.update(kw)
    return Result(key=key, **base)


def test_inserts_are_idempotent_and_keyed(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        assert store.add_results([_row("a"), _row("b", 0.7)], "s1") == 2
        assert store.add_results([_row("a", 0.9), _row("c")], "s1") == 1  # "a" keeps its first value
        got = store.existing(["a", "b", "zzz"])
        assert set(got) == {"a", "b"} and got["a"].value == 0.5 and got["b"].correct == 70
        assert store.count() == 3 and store.count("s1") == 3


def test_study_membership_and_reuse(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        store.register_study("s1", {"lambdas": [1.0]})
        store.add_results([_row("a"), _row("b")], "s1")
        store.register_study("s2", {"lambdas": [0.5, 1.0]})
        store.link_results("s2", ["b"])
        store.add_results([_row("c")], "s2")
        assert [r.key for r in store.results("s1")] == ["a", "b"]
        assert sorted(r.key for r in store.results("s2")) == ["b", "c"]
        assert store.studies() == ["s1", "s2"] and store.resolve_study(None) == "s2"
        assert store.study_config("s2") == {"lambdas": [0.5, 1.0]}
        with pytest.raises(QvecError, match="no study named 'nope'"):
            store.resolve_study("nope")


def test_a_changed_config_resets_the_study_membership_only(tmp_path):
    """Rerunning a study name with another config must not mix the old config's rows into its report."""
    with ResultStore(tmp_path / "r.db") as store:
        store.register_study("s", {"granularity": "channel"})
        store.add_results([_row("a"), _row("b")], "s")
        store.add_trainings([Training("s", "k1", "ft", "r", None, 1, 3.0)])
        store.register_study("s", {"granularity": "channel"})  # same config (a resume): nothing changes
        assert store.count("s") == 2 and len(store.trainings("s")) == 1
        store.register_study("s", {"granularity": "tensor"})
        assert store.count("s") == 0 and store.trainings("s") == [] and store.count() == 2  # rows kept for reuse
        store.link_results("s", ["b"])
        assert [r.key for r in store.results("s")] == ["b"]


def test_job_log_is_append_only_and_atomic_with_rows(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        job = JobRecord(key="k1", kind="cells", label="cells w3 a -> b", study="s", bits=3, seconds=1.5)
        assert store.add_job(job, [_row("x"), _row("y")], "s") == 2
        store.add_job(job, [_row("x")], "s")
        assert [j.key for j in store.jobs()] == ["k1", "k1"]  # a repeat is visible, not hidden
        assert store.jobs("s")[0].seconds == 1.5 and store.count("s") == 2
        store.add_trainings([Training("s", "t1", "qat", "b", 3, 2038, 12.5)])
        store.add_trainings([Training("s", "t1", "qat", "b", 3, 2038, 13.0)])
        assert [(t.task, t.seconds) for t in store.trainings("s")] == [("b", 13.0)]


def test_failed_transaction_writes_nothing(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        with pytest.raises(ZeroDivisionError), store.transaction():
            store._insert_results([_row("a")], "s")
            1 / 0  # noqa: B018
        assert store.count() == 0


def test_wal_mode_and_other_connections_see_committed_rows(tmp_path):
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.add_results([_row("a")], "s")
        other = sqlite3.connect(db)
        assert other.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1
        other.close()


def test_bad_database_files(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(QvecError, match="not a usable results database"):
        ResultStore(bad)
    with ResultStore(tmp_path / "empty.db") as store:
        with pytest.raises(QvecError, match="holds no study yet"):
            store.resolve_study(None)


def test_export_csv_and_parquet(tmp_path):
    import pyarrow.parquet as pq

    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.register_study("s", {})
        store.add_results([_row("a"), _row("b", 0.25, kind="ft", donor="", bits=None, quant="", lam=None)], "s")
        store.export_csv(tmp_path / "r.csv")
        store.export_parquet(tmp_path / "r.parquet", "s")
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 2
    ft = next(r for r in rows if r["kind"] == "ft")
    assert ft["bits"] == "" and float(ft["value"]) == 0.25
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.num_rows == 2 and table.column_names == list(COLUMNS)
    assert sorted(table.column("value").to_pylist()) == [0.25, 0.5]
    assert main(["grid", "export", str(db), "--csv", str(tmp_path / "c.csv"), "--parquet",
                 str(tmp_path / "c.parquet")]) == 0
    assert (tmp_path / "c.csv").is_file() and (tmp_path / "c.parquet").is_file()
    assert main(["grid", "export", str(db)]) == 2
