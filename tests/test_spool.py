"""The durable spool: order, bounds, persistence and recovery."""

import os

import pytest

from edge_agent.errors import SpoolError
from edge_agent.spool import Spool


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


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions, so a read-only directory cannot be made")
def test_unwritable_directory_is_clear(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o500)
    try:
        with pytest.raises(SpoolError) as info:
            Spool(folder / "spool.db")
    finally:
        os.chmod(folder, 0o700)

    assert "cannot open the spool" in str(info.value)
