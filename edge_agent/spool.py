"""The durable spool: telemetry waits here, on flash, until the broker acknowledges it.

SQLite in WAL mode. Appends commit with ``synchronous=FULL`` so a message is
on stable storage before ``append`` returns: only then is it accepted.
Acknowledged messages are deleted in batches with ``synchronous=NORMAL``; a
delete lost to power failure only means the message is sent again, which
at-least-once delivery allows.

The spool is bounded by message count and payload bytes. When full, the
overflow policy ``drop-oldest`` (the default) deletes the oldest messages to
make room; ``drop-newest`` rejects the new one. Either way every dropped
message is added to ``dropped_total``, which survives restarts and is
reported in telemetry.
"""

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from edge_agent.errors import SpoolError

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class SpooledMessage:
    """One accepted message waiting for its PUBACK."""

    id: int
    topic: str
    payload: bytes
    created: float


@dataclass(frozen=True)
class SpoolStats:
    """Depth, size and loss counters of the spool."""

    depth: int
    bytes: int
    oldest_age_s: Optional[float]
    dropped_total: int

    def to_dict(self) -> dict:
        return {
            "depth": self.depth,
            "bytes": self.bytes,
            "oldest_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s, 1),
            "dropped_total": self.dropped_total,
        }


class Spool:
    """A bounded, crash-safe FIFO of MQTT messages. Safe to share between threads."""

    def __init__(
        self,
        path: Path,
        max_messages: int = 100_000,
        max_bytes: int = 32 * 1024 * 1024,
        overflow: str = "drop-oldest",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if overflow not in ("drop-oldest", "drop-newest"):
            raise ValueError(f"overflow must be 'drop-oldest' or 'drop-newest', got {overflow!r}")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.overflow = overflow
        self._clock = clock
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = None
        self._depth = 0
        self._bytes = 0
        self._open()

    # --- opening and recovery --------------------------------------------

    def _open(self) -> None:
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            if not self._looks_corrupt(exc):
                raise SpoolError(
                    f"{self.path}: cannot open the spool: {exc}; check that the directory exists, is writable "
                    "by the agent's user and that the disk is not full"
                ) from None
            self._move_aside(exc)
            try:
                self._connect()
            except sqlite3.DatabaseError as retry_exc:
                raise SpoolError(f"{self.path}: cannot create a fresh spool: {retry_exc}") from None

    @staticmethod
    def _looks_corrupt(exc: sqlite3.DatabaseError) -> bool:
        text = str(exc).lower()
        return "malformed" in text or "not a database" in text or "corrupt" in text or "file is encrypted" in text

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed append survives power loss, not only a process crash.
            db.execute("PRAGMA synchronous=FULL")
            # The spool is read at its head and written at its tail, so a small page cache suffices
            # (SQLite's default is 2 MiB per connection, a lot on a gateway).
            db.execute("PRAGMA cache_size=-256")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed (quick_check: {check})")
            db.executescript(_SCHEMA)
            depth, size = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM message").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        self._db = db
        self._depth = depth
        self._bytes = size
        logger.info("spool %s opened: %d messages, %d bytes queued", self.path, depth, size)

    def _move_aside(self, exc: Exception) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                try:
                    os.replace(source, Path(str(target) + suffix))
                except OSError as move_exc:
                    raise SpoolError(f"{source}: the spool is corrupt ({exc}) and cannot be moved aside: {move_exc}") from None
        logger.error("spool %s is corrupt (%s); moved it to %s and started a fresh one", self.path, exc, target)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # --- writing ---------------------------------------------------------

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def append(self, topic: str, payload: bytes) -> Optional[int]:
        """Store one message durably; return its id, or None when ``drop-newest`` rejected it."""
        return self.append_sequenced(topic, lambda _seq: payload, sequence_key=None)

    def append_sequenced(
        self, topic: str, build: Callable[[int], bytes], sequence_key: Optional[str] = "seq"
    ) -> Optional[int]:
        """Allocate the next sequence number under ``sequence_key``, build the payload and store it.

        The sequence counter and the message are committed in one
        transaction, so a crash never reuses or skips a sequence number of an
        accepted message.
        """
        with self._lock:
            db = self._require_db()
            try:
                db.execute("BEGIN IMMEDIATE")
                sequence = 0
                if sequence_key is not None:
                    sequence = self._meta(sequence_key) + 1
                    self._set_meta(sequence_key, sequence)
                payload = build(sequence)
                if not self._make_room(len(payload)):
                    db.execute("COMMIT")
                    return None
                cursor = db.execute(
                    "INSERT INTO message(topic, payload, created) VALUES(?, ?, ?)", (topic, payload, self._clock())
                )
                db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                self._rollback()
                raise SpoolError(f"{self.path}: cannot store a message: {exc}") from None
            self._depth += 1
            self._bytes += len(payload)
            return cursor.lastrowid

    def _make_room(self, size: int) -> bool:
        """Apply the overflow policy inside the open transaction; False means reject the new message."""
        over_count = self._depth + 1 - self.max_messages
        over_bytes = self._bytes + size - self.max_bytes
        if over_count <= 0 and over_bytes <= 0:
            return True

        if self.overflow == "drop-newest" or size > self.max_bytes:
            self._set_meta("dropped_total", self._meta("dropped_total") + 1)
            logger.warning("spool full (%d messages, %d bytes): new message dropped", self._depth, self._bytes)
            return False

        dropped = 0
        freed = 0
        rows = self._db.execute("SELECT id, length(payload) FROM message ORDER BY id")
        doomed: List[int] = []
        for row_id, length in rows:
            if dropped >= over_count and freed >= over_bytes:
                break
            doomed.append(row_id)
            dropped += 1
            freed += length
        self._db.executemany("DELETE FROM message WHERE id = ?", ((i,) for i in doomed))
        self._set_meta("dropped_total", self._meta("dropped_total") + dropped)
        self._depth -= dropped
        self._bytes -= freed
        logger.warning("spool full: dropped the %d oldest messages (%d bytes) to make room", dropped, freed)
        return True

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged messages; return how many were removed."""
        id_list = list(ids)
        if not id_list:
            return 0
        with self._lock:
            db = self._require_db()
            try:
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("BEGIN IMMEDIATE")
                removed = 0
                freed = 0
                for start in range(0, len(id_list), 500):
                    chunk = id_list[start:start + 500]
                    marks = ",".join("?" * len(chunk))
                    size = db.execute(f"SELECT coalesce(sum(length(payload)), 0), count(*) FROM message WHERE id IN ({marks})", chunk).fetchone()
                    db.execute(f"DELETE FROM message WHERE id IN ({marks})", chunk)
                    freed += size[0]
                    removed += size[1]
                db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                self._rollback()
                raise SpoolError(f"{self.path}: cannot delete acknowledged messages: {exc}") from None
            finally:
                db.execute("PRAGMA synchronous=FULL")
            self._depth -= removed
            self._bytes -= freed
            return removed

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(f"{self.path}: the spool is closed")
        return self._db

    # --- reading ---------------------------------------------------------

    def peek(self, limit: int, after_id: int = 0) -> List[SpooledMessage]:
        """Return up to ``limit`` messages with ids above ``after_id``, oldest first."""
        with self._lock:
            rows = self._require_db().execute(
                "SELECT id, topic, payload, created FROM message WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [SpooledMessage(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def sequence(self, key: str = "seq") -> int:
        with self._lock:
            self._require_db()
            return self._meta(key)

    def stats(self) -> SpoolStats:
        with self._lock:
            db = self._require_db()
            # The smallest id is the oldest message; this walks the primary key instead of scanning.
            row = db.execute("SELECT created FROM message ORDER BY id LIMIT 1").fetchone()
            oldest = row[0] if row else None
            dropped = self._meta("dropped_total")
            return SpoolStats(
                depth=self._depth,
                bytes=self._bytes,
                oldest_age_s=None if oldest is None else max(0.0, self._clock() - oldest),
                dropped_total=dropped,
            )

    @property
    def depth(self) -> int:
        return self._depth
