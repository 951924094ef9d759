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

Failures do not stop the agent:

- A file that SQLite reports as corrupt (at open or later) is renamed to
  ``<name>.corrupt-<UTC time>`` and a fresh spool is started. Only the newest
  renamed copy is kept, so the flash used stays bounded.
- When the file cannot be opened or written (read-only directory, full disk,
  I/O error), the spool reports itself unavailable. Every later append tries
  again. A message that could not be stored raises ``SpoolError``: it was not
  accepted, and it is counted in ``unstored_total``.
"""

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, NamedTuple, Optional, Tuple

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

# Checkpoint the WAL every 256 pages (1 MiB with 4 KiB pages) and truncate it
# back to at most 1 MiB, so the WAL adds a bounded amount to the file's size.
WAL_CHECKPOINT_PAGES = 256
WAL_SIZE_LIMIT_BYTES = 1024 * 1024

# ``checkpoint_due`` turns true after this many payload bytes were deleted. Deleting
# 1 KB messages writes about 0.55 bytes to the WAL per payload byte, so the
# checkpoint normally runs well before SQLite's own one at WAL_CHECKPOINT_PAGES.
CHECKPOINT_AFTER_DELETED_BYTES = 1024 * 1024

# How many renamed corrupt copies stay beside the spool for later inspection.
KEEP_CORRUPT_COPIES = 1

# Message ids are deleted in chunks of this many per statement.
_DELETE_CHUNK = 500

CORRUPT = "corrupt"
FULL = "full"
UNAVAILABLE = "unavailable"


def classify_error(exc: sqlite3.Error) -> str:
    """Sort an SQLite error into ``corrupt``, ``full`` or ``unavailable`` (anything else)."""
    name = getattr(exc, "sqlite_errorname", "") or ""  # Python 3.11 and newer
    text = str(exc).lower()
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or name in ("SQLITE_IOERR_READ", "SQLITE_IOERR_SHORT_READ"):
        return CORRUPT
    if "malformed" in text or "not a database" in text or "file is encrypted" in text:
        return CORRUPT
    if name == "SQLITE_FULL" or "disk is full" in text:
        return FULL
    return UNAVAILABLE


def milliseconds_since_boot() -> int:
    """Return CLOCK_MONOTONIC in milliseconds: on Linux it counts from boot and never goes back within a boot."""
    return time.monotonic_ns() // 1_000_000


class SpooledMessage(NamedTuple):
    """One accepted message waiting for its PUBACK.

    A named tuple, because a drain builds one per message: that costs about a
    quarter of a frozen dataclass's ``__init__`` (CPython 3.11).
    """

    id: int
    topic: str
    payload: bytes
    created: float


@dataclass(frozen=True)
class SpoolStats:
    """Depth, size, availability and loss counters of the spool."""

    depth: int
    bytes: int
    oldest_age_s: Optional[float]
    dropped_total: int
    unstored_total: int
    available: bool

    def to_dict(self) -> dict:
        return {
            "depth": self.depth,
            "bytes": self.bytes,
            "oldest_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s, 1),
            "dropped_total": self.dropped_total,
            "unstored_total": self.unstored_total,
            "available": self.available,
        }


class Spool:
    """A bounded, crash-safe FIFO of MQTT messages. Safe to share between threads.

    ``sequence_key`` names the counter that ``append_sequenced`` advances.
    When the spool file is created (first start, or a corrupt one replaced),
    that counter starts at ``sequence_floor()`` instead of 0. The agent keys
    the counter by boot and passes the milliseconds since boot as the floor,
    so a replaced file never hands out a number already used in this boot.
    """

    def __init__(
        self,
        path: Path,
        max_messages: int = 100_000,
        max_bytes: int = 32 * 1024 * 1024,
        overflow: str = "drop-oldest",
        clock: Callable[[], float] = time.time,
        sequence_key: str = "seq",
        sequence_floor: Callable[[], int] = lambda: 0,
    ) -> None:
        if overflow not in ("drop-oldest", "drop-newest"):
            raise ValueError(f"overflow must be 'drop-oldest' or 'drop-newest', got {overflow!r}")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.sequence_key = sequence_key
        self.last_error: Optional[str] = None
        self._clock = clock
        self._sequence_floor = sequence_floor
        self._lock = threading.Lock()
        # Held by ``checkpoint`` and while a corrupt file is moved aside, so a checkpoint
        # never opens the moved file together with the fresh file's WAL.
        self._file_lock = threading.Lock()
        self._deleted_since_checkpoint = 0
        self._db: Optional[sqlite3.Connection] = None
        self._closed = False
        self._depth = 0
        self._bytes = 0
        # Kept in memory as well, so they carry over to a fresh file after corruption.
        self._dropped_total = 0
        self._unstored_total = 0
        self._stored_counters: Tuple[int, int] = (0, 0)
        self._max_id = 0
        self._last_sequence = 0
        with self._lock:
            self._reopen()

    # --- opening and recovery --------------------------------------------

    @property
    def available(self) -> bool:
        return self._db is not None

    def _reopen(self) -> bool:
        """Open the file unless it is open; on failure log why and stay unavailable."""
        if self._db is not None:
            return True
        if self._closed:
            return False
        try:
            self._open()
        except SpoolError as exc:
            self.last_error = str(exc)
            logger.error("spool unavailable, readings are not stored until it opens: %s", exc)
            return False
        self.last_error = None
        return True

    def _open(self) -> None:
        try:
            self._connect()
        except sqlite3.Error as exc:
            if classify_error(exc) != CORRUPT:
                raise SpoolError(f"{self.path}: cannot open the spool: {exc}{self._directory_problem()}") from None
            self._replace_corrupt(exc)
        except OSError as exc:
            raise SpoolError(
                f"{self.path}: cannot open the spool: {exc.strerror or exc}{self._directory_problem()}"
            ) from None

    def _directory_problem(self) -> str:
        """Describe why the spool's directory may refuse writes, with the fix."""
        folder = self.path.parent
        try:
            stats = os.statvfs(folder)
        except OSError:
            return f"; create the directory {folder} and make it writable by the agent's user"
        if stats.f_flag & os.ST_RDONLY:
            return f"; the file system of {folder} is mounted read-only: remount it read-write"
        if stats.f_bavail * stats.f_frsize < 64 * 1024:
            return f"; the file system of {folder} is full: free space on it"
        if not os.access(folder, os.W_OK):
            return f"; the directory {folder} is not writable by this user: fix its owner or mode"
        return f"; check that {folder} is writable by the agent's user and that the disk is not full"

    def _connect(self) -> None:
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            logger.warning("created the spool directory %s (mode 0700); check spool.path if this is not intended", self.path.parent)
        # An empty file is what a crash right after creating it leaves behind.
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if fresh:
            # Private to the agent's user whatever the umask; SQLite gives the WAL and shm files the same mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            self._configure(db)
            db.executescript(_SCHEMA)
            if fresh:
                self._seed_fresh_file(db)
            self._load_state(db)
        except sqlite3.Error:
            db.close()
            raise
        self._db = db
        logger.info("spool %s opened: %d messages, %d bytes queued", self.path, self._depth, self._bytes)

    @staticmethod
    def _configure(db: sqlite3.Connection) -> None:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL mode (journal_mode is {mode})")
        # FULL: a committed append survives power loss, not only a process crash.
        db.execute("PRAGMA synchronous=FULL")
        # The spool is read at its head and written at its tail, so a small page cache suffices
        # (SQLite's default is 2 MiB per connection, a lot on a gateway).
        db.execute("PRAGMA cache_size=-256")
        # Debian's SQLite is built with SECURE_DELETE, which also writes each freed page out
        # as zeros: about twice the flash writes per acknowledged message. FAST (SQLite 3.20
        # and newer) zeroes deleted rows only in pages written anyway; freed pages keep their
        # old telemetry until reused.
        db.execute("PRAGMA secure_delete=FAST")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        check = db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"database disk image is malformed (quick_check: {check})")

    def _seed_fresh_file(self, db: sqlite3.Connection) -> None:
        """Start ids and the sequence above anything this process or this boot has used."""
        sequence = max(self._sequence_floor(), self._last_sequence)
        db.execute("BEGIN IMMEDIATE")
        if self._max_id:
            db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES('message', ?)", (self._max_id,))
        if sequence:
            self._set_meta(db, self.sequence_key, sequence)
        db.execute("COMMIT")

    def _load_state(self, db: sqlite3.Connection) -> None:
        depth, size = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM message").fetchone()
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'message'").fetchone()
        stored = (self._meta(db, "dropped_total"), self._meta(db, "unstored_total"))
        self._depth = depth
        self._bytes = size
        self._max_id = max(self._max_id, row[0] if row else 0)
        self._stored_counters = stored
        self._dropped_total = max(self._dropped_total, stored[0])
        self._unstored_total = max(self._unstored_total, stored[1])
        self._last_sequence = max(self._last_sequence, self._meta(db, self.sequence_key))

    def _replace_corrupt(self, exc: sqlite3.Error) -> None:
        """Rename the corrupt file (with its WAL and shared memory) and start a fresh one."""
        with self._file_lock:
            self._disconnect()
            lost = self._depth
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                source = Path(str(self.path) + suffix)
                if source.exists():
                    try:
                        os.replace(source, Path(str(target) + suffix))
                    except OSError as move_exc:
                        raise SpoolError(
                            f"{source}: the spool is corrupt ({exc}) and cannot be moved aside: {move_exc.strerror or move_exc}; "
                            "delete the file or fix the directory's permissions"
                        ) from None
            self._depth = 0
            self._bytes = 0
            contents = f", with {lost} queued messages," if lost else ""
            logger.error("spool %s is corrupt (%s); moved it%s to %s and started a fresh one", self.path, exc, contents, target)
            self._prune_corrupt_copies()
            try:
                self._connect()
            except (sqlite3.Error, OSError) as retry_exc:
                raise SpoolError(f"{self.path}: cannot create a fresh spool: {retry_exc}") from None

    def _prune_corrupt_copies(self) -> None:
        copies = sorted(self.path.parent.glob(f"{self.path.name}.corrupt-*[0-9]"), reverse=True)
        for old in copies[KEEP_CORRUPT_COPIES:]:
            for suffix in ("", "-wal", "-shm"):
                try:
                    Path(str(old) + suffix).unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    logger.warning("cannot delete the old corrupt spool copy %s: %s", old, exc)
            logger.info("deleted the old corrupt spool copy %s", old)

    def _disconnect(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error as exc:
                logger.debug("closing spool %s failed: %s", self.path, exc)

    def _failure(self, action: str, exc: sqlite3.Error) -> Tuple[SpoolError, str]:
        """Turn an SQLite error during ``action`` into a SpoolError and recover where possible."""
        kind = classify_error(exc)
        if kind == CORRUPT:
            try:
                self._replace_corrupt(exc)
            except SpoolError as replace_exc:
                self.last_error = str(replace_exc)
                logger.error("%s", replace_exc)
        elif kind == UNAVAILABLE:
            # Reopened on the next append, which clears a read-only or I/O error once it is gone.
            self._disconnect()
        fix = {FULL: "free space on its file system", CORRUPT: "a fresh spool was started"}.get(
            kind, "check the directory, its mount and the kernel log"
        )
        error = SpoolError(f"{self.path}: cannot {action}: {exc}; {fix}")
        self.last_error = str(error)
        return error, kind

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._disconnect()

    # --- writing ---------------------------------------------------------

    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _set_meta(db: sqlite3.Connection, key: str, value: int) -> None:
        db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value)
        )

    def append(self, topic: str, payload: bytes) -> Optional[int]:
        """Store one message durably; return its id, or None when ``drop-newest`` rejected it."""
        return self._append(topic, lambda _seq: payload, sequence_key=None)

    def append_sequenced(
        self, topic: str, build: Callable[[int], bytes], sequence_key: Optional[str] = None
    ) -> Optional[int]:
        """Allocate the next sequence number, build the payload with it and store it.

        The counter is ``sequence_key``, or the spool's own key when None. The
        counter and the message are committed in one transaction, so a crash
        never reuses a number. A message rejected by ``drop-newest`` still
        uses its number, which leaves a gap where the drop happened.
        Raises ``SpoolError`` when the message could not be stored.
        """
        return self._append(topic, build, sequence_key or self.sequence_key)

    def _append(self, topic: str, build: Callable[[int], bytes], sequence_key: Optional[str]) -> Optional[int]:
        with self._lock:
            if self._closed:
                raise SpoolError(f"{self.path}: the spool is closed")
            if not self._reopen():
                self._unstored_total += 1
                raise SpoolError(f"message not stored because the spool is unavailable: {self.last_error}")
            try:
                return self._insert(topic, build, sequence_key)
            except sqlite3.Error as exc:
                error, kind = self._failure("store a message", exc)
            if kind == CORRUPT and self._db is not None:
                try:
                    return self._insert(topic, build, sequence_key)
                except sqlite3.Error as retry_exc:
                    error, kind = self._failure("store a message", retry_exc)
            self._unstored_total += 1
            raise error

    def _insert(self, topic: str, build: Callable[[int], bytes], sequence_key: Optional[str]) -> Optional[int]:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            sequence = 0
            if sequence_key is not None:
                sequence = self._meta(db, sequence_key) + 1
                self._set_meta(db, sequence_key, sequence)
            payload = build(sequence)
            room = self._make_room(db, len(payload))
            row_id = None
            if room is not None:
                cursor = db.execute(
                    "INSERT INTO message(topic, payload, created) VALUES(?, ?, ?)", (topic, payload, self._clock())
                )
                row_id = cursor.lastrowid
            counters = (self._dropped_total + (1 if room is None else room[0]), self._unstored_total)
            if counters != self._stored_counters:
                self._set_meta(db, "dropped_total", counters[0])
                self._set_meta(db, "unstored_total", counters[1])
            db.execute("COMMIT")
        except BaseException:
            # Also when ``build`` raises: an open transaction would block every later append.
            self._rollback(db)
            raise

        # Only now, with the transaction committed, do the in-memory counters change.
        self._stored_counters = counters
        self._dropped_total = counters[0]
        if sequence_key == self.sequence_key:
            self._last_sequence = sequence
        # The text stays the same from drop to drop, so the log's repeat filter collapses a long overflow.
        if room is None:
            logger.warning(
                "spool %s is full (max %d messages, %d bytes): new messages are dropped and counted in dropped_total",
                self.path, self.max_messages, self.max_bytes,
            )
            return None
        if room[0]:
            logger.warning(
                "spool %s is full (max %d messages, %d bytes): the oldest messages are dropped and counted in dropped_total",
                self.path, self.max_messages, self.max_bytes,
            )
        self._depth += 1 - room[0]
        self._bytes += len(payload) - room[1]
        self._max_id = max(self._max_id, row_id)
        return row_id

    def _make_room(self, db: sqlite3.Connection, size: int) -> Optional[Tuple[int, int]]:
        """Apply the overflow policy inside the open transaction.

        Returns ``(messages dropped, bytes freed)``, or None when the new
        message is to be rejected.
        """
        over_count = self._depth + 1 - self.max_messages
        over_bytes = self._bytes + size - self.max_bytes
        if over_count <= 0 and over_bytes <= 0:
            return (0, 0)
        if self.overflow == "drop-newest" or size > self.max_bytes:
            return None

        dropped = 0
        freed = 0
        doomed: List[int] = []
        cursor = db.execute("SELECT id, length(payload) FROM message ORDER BY id")
        for row_id, length in cursor:
            if dropped >= over_count and freed >= over_bytes:
                break
            doomed.append(row_id)
            dropped += 1
            freed += length
        cursor.close()
        self._delete(db, doomed)
        return (dropped, freed)

    @staticmethod
    def _delete(db: sqlite3.Connection, ids: List[int]) -> Tuple[int, int]:
        """Delete ``ids``; return how many rows and payload bytes went."""
        ordered = sorted(ids)
        if ordered[-1] - ordered[0] + 1 == len(ordered) and len(set(ordered)) == len(ordered):
            # Acknowledgements mostly arrive in order, so one range replaces a long IN list.
            bounds = (ordered[0], ordered[-1])
            size, count = db.execute(
                "SELECT coalesce(sum(length(payload)), 0), count(*) FROM message WHERE id BETWEEN ? AND ?", bounds
            ).fetchone()
            db.execute("DELETE FROM message WHERE id BETWEEN ? AND ?", bounds)
            return count, size

        removed = 0
        freed = 0
        for start in range(0, len(ids), _DELETE_CHUNK):
            chunk = ids[start:start + _DELETE_CHUNK]
            marks = ",".join("?" * len(chunk))
            size, count = db.execute(
                f"SELECT coalesce(sum(length(payload)), 0), count(*) FROM message WHERE id IN ({marks})", chunk
            ).fetchone()
            db.execute(f"DELETE FROM message WHERE id IN ({marks})", chunk)
            freed += size
            removed += count
        return removed, freed

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged messages; return how many were removed.

        Raises ``SpoolError`` when the delete fails; the messages then stay
        queued and are sent again, which at-least-once delivery allows.
        """
        id_list = list(ids)
        if not id_list:
            return 0
        with self._lock:
            db = self._db
            if db is None:
                raise SpoolError(f"{self.path}: cannot delete acknowledged messages: spool unavailable ({self.last_error})")
            try:
                removed, freed = self._delete_acknowledged(db, id_list)
            except sqlite3.Error as exc:
                raise self._failure("delete acknowledged messages", exc)[0] from None
            self._depth -= removed
            self._bytes -= freed
            self._deleted_since_checkpoint += freed
            return removed

    def _delete_acknowledged(self, db: sqlite3.Connection, ids: List[int]) -> Tuple[int, int]:
        # NORMAL: a delete lost to power failure only sends the message again.
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
            result = self._delete(db, ids)
            db.execute("COMMIT")
            return result
        except sqlite3.Error:
            self._rollback(db)
            raise
        finally:
            db.execute("PRAGMA synchronous=FULL")

    @property
    def checkpoint_due(self) -> bool:
        """Whether enough was deleted since the last ``checkpoint`` call to run one."""
        return self._deleted_since_checkpoint >= CHECKPOINT_AFTER_DELETED_BYTES

    def checkpoint(self) -> None:
        """Copy the WAL back into the database file without taking the spool's lock.

        A PASSIVE checkpoint on a short-lived second connection: appends,
        reads and deletes go on meanwhile, and its fsyncs block only the
        calling thread. A failure is logged at debug level, because SQLite's
        own checkpoint at ``WAL_CHECKPOINT_PAGES`` still bounds the WAL.
        """
        self._deleted_since_checkpoint = 0
        with self._file_lock:
            if self._closed or self._db is None:
                return
            try:
                # mode=rw: never create a file that is not there.
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None, timeout=0)
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                finally:
                    db.close()
            except sqlite3.Error as exc:
                logger.debug("checkpoint of spool %s failed: %s", self.path, exc)

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # --- reading ---------------------------------------------------------

    def peek(self, limit: int, after_id: int = 0) -> List[SpooledMessage]:
        """Return up to ``limit`` messages with ids above ``after_id``, oldest first.

        Returns nothing while the spool is unavailable; raises ``SpoolError``
        when the read fails.
        """
        with self._lock:
            db = self._db
            if db is None:
                return []
            try:
                rows = db.execute(
                    "SELECT id, topic, payload, created FROM message WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._failure("read queued messages", exc)[0] from None
        return [SpooledMessage._make(row) for row in rows]

    def sequence(self, key: Optional[str] = None) -> int:
        """Return the last number handed out under ``key`` (default: the spool's own key)."""
        with self._lock:
            if self._db is None:
                raise SpoolError(f"{self.path}: spool unavailable ({self.last_error})")
            return self._meta(self._db, key or self.sequence_key)

    def stats(self) -> SpoolStats:
        with self._lock:
            oldest = None
            if self._db is not None:
                try:
                    # The smallest id is the oldest message; this walks the primary key instead of scanning.
                    row = self._db.execute("SELECT created FROM message ORDER BY id LIMIT 1").fetchone()
                    oldest = row[0] if row else None
                except sqlite3.Error as exc:
                    logger.debug("spool %s: reading the oldest message failed: %s", self.path, exc)
            return SpoolStats(
                depth=self._depth,
                bytes=self._bytes,
                oldest_age_s=None if oldest is None else max(0.0, self._clock() - oldest),
                dropped_total=self._dropped_total,
                unstored_total=self._unstored_total,
                available=self._db is not None,
            )

    @property
    def depth(self) -> int:
        return self._depth
