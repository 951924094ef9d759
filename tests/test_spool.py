"""The durable spool: order, bounds, persistence and recovery."""

import signal
import sqlite3
import subprocess
import sys

import pytest

from edge_agent.errors import SpoolError
from edge_agent.spool import CORRUPT, FULL, UNAVAILABLE, Spool, classify_error


@pytest.fixture
def spool(tmp_path):
    instance = Spool(tmp_path / "spool.db", max_messages=100, max_bytes=1 << 20)
    yield instance
    instance.close()


def test_append_peek_ack_in_order(spool):
    ids = [spool.append("t", f"m{i}".encode()) for i in range(5)]

    messages = spool.peek(10)

    assert [m.id for m in messages] == ids
    assert [m.payload for m in messages] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert spool.ack(ids[:2]) == 2
    assert [m.payload for m in spool.peek(10)] == [b"m2", b"m3", b"m4"]
    assert spool.stats().depth == 3


def test_peek_after_id(spool):
    ids = [spool.append("t", b"x") for _ in range(4)]

    assert [m.id for m in spool.peek(2, after_id=ids[1])] == ids[2:]


def test_messages_survive_reopen(tmp_path):
    first = Spool(tmp_path / "spool.db")
    first.append("t", b"kept")
    first.close()

    second = Spool(tmp_path / "spool.db")
    try:
        assert [m.payload for m in second.peek(10)] == [b"kept"]
        assert second.depth == 1
    finally:
        second.close()


def test_sequence_is_persistent_and_gapless(tmp_path):
    spool = Spool(tmp_path / "spool.db")
    seqs = []
    spool.append_sequenced("t", lambda s: seqs.append(s) or b"a", "seq:boot")
    spool.append_sequenced("t", lambda s: seqs.append(s) or b"b", "seq:boot")
    spool.close()

    reopened = Spool(tmp_path / "spool.db")
    try:
        reopened.append_sequenced("t", lambda s: seqs.append(s) or b"c", "seq:boot")
        assert seqs == [1, 2, 3]
        assert reopened.sequence("seq:boot") == 3
    finally:
        reopened.close()


def test_drop_oldest_counts_drops(tmp_path):
    spool = Spool(tmp_path / "spool.db", max_messages=10)
    try:
        for i in range(15):
            spool.append("t", str(i).encode())

        stats = spool.stats()
        assert stats.depth == 10
        assert stats.dropped_total == 5
        assert [m.payload for m in spool.peek(100)] == [str(i).encode() for i in range(5, 15)]
    finally:
        spool.close()


def test_drop_newest_rejects(tmp_path):
    spool = Spool(tmp_path / "spool.db", max_messages=10, overflow="drop-newest")
    try:
        results = [spool.append("t", str(i).encode()) for i in range(12)]

        assert results[-2:] == [None, None]
        assert spool.stats().dropped_total == 2
        assert [m.payload for m in spool.peek(1)] == [b"0"]
    finally:
        spool.close()


def test_byte_bound(tmp_path):
    spool = Spool(tmp_path / "spool.db", max_messages=1000, max_bytes=64 * 1024)
    try:
        for _ in range(10):
            spool.append("t", b"x" * 10_000)

        stats = spool.stats()
        assert stats.bytes <= 64 * 1024
        assert stats.dropped_total == 4
    finally:
        spool.close()


def test_corrupt_file_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not a database" * 100)

    spool = Spool(path)
    try:
        assert spool.depth == 0
        spool.append("t", b"fresh")
    finally:
        spool.close()

    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1
    assert "is corrupt" in caplog.text


def test_append_durable_on_return(tmp_path):
    path = tmp_path / "spool.db"
    # The process kills itself the moment append returns.
    script = (
        "import os, signal, sys\n"
        "from edge_agent.spool import Spool\n"
        "Spool(sys.argv[1]).append('t', b'accepted')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True)

    assert result.returncode == -signal.SIGKILL
    spool = Spool(path)
    try:
        assert [m.payload for m in spool.peek(10)] == [b"accepted"]
    finally:
        spool.close()


def test_new_file_is_private(tmp_path):
    spool = Spool(tmp_path / "spool.db")
    try:
        spool.append("t", b"x")
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    finally:
        spool.close()

    assert modes == {"spool.db": 0o600, "spool.db-wal": 0o600, "spool.db-shm": 0o600}


def test_failing_build_rolls_back(spool):
    def build(sequence: int) -> bytes:
        raise ValueError("reading failed")

    with pytest.raises(ValueError):
        spool.append_sequenced("t", build)
    spool.append_sequenced("t", lambda sequence: str(sequence).encode())

    assert [m.payload for m in spool.peek(10)] == [b"1"]


def test_closed_spool_rejects_append(tmp_path):
    spool = Spool(tmp_path / "spool.db")
    spool.close()

    with pytest.raises(SpoolError, match="the spool is closed"):
        spool.append("t", b"late")


def test_unopenable_path_counts_unstored(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")

    spool = Spool(blocker / "spool.db")
    try:
        assert spool.available is False
        assert "cannot open the spool" in spool.last_error
        assert "spool unavailable" in caplog.text
        with pytest.raises(SpoolError):
            spool.append("t", b"lost")
        assert spool.peek(10) == []
        assert spool.stats().unstored_total == 1
    finally:
        spool.close()


def test_recovers_and_persists_unstored(tmp_path):
    folder = tmp_path / "later"
    folder.write_text("")
    spool = Spool(folder / "spool.db")
    with pytest.raises(SpoolError):
        spool.append("t", b"lost")

    folder.unlink()
    folder.mkdir()
    spool.append("t", b"kept")
    spool.close()

    reopened = Spool(folder / "spool.db")
    try:
        assert reopened.stats().unstored_total == 1
        assert [m.payload for m in reopened.peek(10)] == [b"kept"]
    finally:
        reopened.close()


def _break_message_table(path):
    """Point the message table at a page beyond the end of the file, as on-disk corruption would."""
    db = sqlite3.connect(str(path), isolation_level=None)
    version = db.execute("PRAGMA schema_version").fetchone()[0]
    db.execute("PRAGMA writable_schema=ON")
    db.execute("UPDATE sqlite_master SET rootpage = 9999 WHERE name = 'message'")
    db.execute(f"PRAGMA schema_version={version + 1}")
    db.close()


def test_corruption_at_run_time_replaced(tmp_path, caplog):
    path = tmp_path / "spool.db"
    spool = Spool(path, max_messages=10, sequence_key="seq:boot")
    try:
        for _ in range(12):
            spool.append_sequenced("t", lambda seq: str(seq).encode())
        last_id = spool.peek(100)[-1].id
        _break_message_table(path)

        new_id = spool.append_sequenced("t", lambda seq: str(seq).encode())

        assert "is corrupt" in caplog.text
        assert new_id > last_id
        assert [m.payload for m in spool.peek(100)] == [b"13"]
        assert spool.stats().dropped_total == 2
    finally:
        spool.close()
    assert len(list(tmp_path.glob("spool.db.corrupt-*[0-9]"))) == 1


def test_fresh_file_starts_at_floor(tmp_path):
    spool = Spool(tmp_path / "spool.db", sequence_key="seq:a", sequence_floor=lambda: 5000)
    spool.append_sequenced("t", lambda seq: str(seq).encode())
    spool.close()

    reopened = Spool(tmp_path / "spool.db", sequence_key="seq:a", sequence_floor=lambda: 9000)
    try:
        reopened.append_sequenced("t", lambda seq: str(seq).encode())
        reopened.append_sequenced("t", lambda seq: str(seq).encode(), "seq:b")
        assert [m.payload for m in reopened.peek(10)] == [b"5001", b"5002", b"1"]
    finally:
        reopened.close()


def test_old_corrupt_copies_pruned(tmp_path):
    old = tmp_path / "spool.db.corrupt-20000101T000000"
    old.write_bytes(b"old")
    (tmp_path / "spool.db").write_bytes(b"garbage" * 1000)

    Spool(tmp_path / "spool.db").close()

    copies = list(tmp_path.glob("spool.db.corrupt-*[0-9]"))
    assert len(copies) == 1
    assert copies[0] != old


def test_drop_newest_leaves_sequence_gap(tmp_path):
    spool = Spool(tmp_path / "spool.db", max_messages=10, overflow="drop-newest")
    try:
        for _ in range(11):
            spool.append_sequenced("t", lambda seq: str(seq).encode())
        spool.ack([spool.peek(1)[0].id])
        spool.append_sequenced("t", lambda seq: str(seq).encode())

        assert spool.peek(100)[-1].payload == b"12"
        assert spool.stats().dropped_total == 1
    finally:
        spool.close()


def test_classify_error_kinds():
    assert classify_error(sqlite3.DatabaseError("database disk image is malformed")) == CORRUPT
    assert classify_error(sqlite3.DatabaseError("file is not a database")) == CORRUPT
    assert classify_error(sqlite3.OperationalError("database or disk is full")) == FULL
    assert classify_error(sqlite3.OperationalError("attempt to write a readonly database")) == UNAVAILABLE


def test_missing_directory_created_private(tmp_path):
    folder = tmp_path / "new" / "spool"

    spool = Spool(folder / "spool.db")
    try:
        assert (folder.stat().st_mode & 0o777) == 0o700
    finally:
        spool.close()



def rows_in_database_file(path) -> int:
    """Count the rows of the database file alone: immutable=1 makes SQLite ignore the WAL."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)
    try:
        return db.execute("SELECT count(*) FROM message").fetchone()[0]
    finally:
        db.close()


def test_checkpoint_copies_deletes_to_file(tmp_path):
    path = tmp_path / "spool.db"
    Spool(path).close()
    db = sqlite3.connect(str(path))
    with db:
        db.executemany("INSERT INTO message(topic, payload, created) VALUES('t', ?, 0)", ([bytes(1000)] for _ in range(1100)))
    db.close()

    spool = Spool(path)
    try:
        spool.ack([m.id for m in spool.peek(2000)])
        due = spool.checkpoint_due
        before = rows_in_database_file(path)
        spool.checkpoint()
        after = rows_in_database_file(path)
    finally:
        spool.close()

    assert due is True
    assert before == 1100
    assert after == 0
    assert spool.checkpoint_due is False


def test_checkpoint_of_closed_spool_skipped(tmp_path):
    spool = Spool(tmp_path / "spool.db")
    spool.close()
    (tmp_path / "spool.db").unlink()

    spool.checkpoint()

    assert not (tmp_path / "spool.db").exists()
