"""The agent's state file: whether the service runs, its uplink state and when it last published.

``edge-agent run`` writes a small JSON file beside the spool,
``<spool path>.state.json`` (by default
``/var/lib/edge-agent/spool.db.state.json``), so that ``edge-agent diagnose``
and the serial console, run as separate processes, can tell a technician
whether the service is running and when the broker last acknowledged a
message. The file is replaced atomically whenever the uplink state or the last
error changes, on the first acknowledgement after a change, and otherwise at
most every ``HEARTBEAT_S`` seconds, which keeps flash writes rare.

Times are stored twice: as wall-clock time for people, and as
``CLOCK_MONOTONIC`` with the kernel boot id, which stays comparable across
processes of one boot even when NTP steps the wall clock after a boot in 1970.
"""

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from edge_agent import __version__

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
HEARTBEAT_S = 30.0
# Warnings about an unwritable state file repeat at most this often.
WRITE_ERROR_LOG_INTERVAL_S = 600.0


def state_file_path(spool_path: Path) -> Path:
    """Return where the agent using ``spool_path`` keeps its state file."""
    spool_path = Path(spool_path)
    return spool_path.with_name(spool_path.name + ".state.json")


@dataclass(frozen=True)
class AgentState:
    """One snapshot of the running agent, as written to the state file."""

    pid: int
    boot_id: str
    state: str
    started: float
    updated: float
    updated_monotonic: float
    version: str = ""
    device_id: str = ""
    broker: str = ""
    last_publish_ack: Optional[float] = None
    last_publish_ack_monotonic: Optional[float] = None
    last_error: Optional[str] = None

    def to_dict(self) -> dict:
        return {"schema": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "AgentState":
        """Build a snapshot from parsed JSON; raise ``ValueError`` when a field is missing or mistyped."""
        try:
            return cls(
                pid=int(data["pid"]),
                boot_id=str(data["boot_id"]),
                state=str(data["state"]),
                started=float(data["started"]),
                updated=float(data["updated"]),
                updated_monotonic=float(data["updated_monotonic"]),
                version=str(data.get("version", "")),
                device_id=str(data.get("device_id", "")),
                broker=str(data.get("broker", "")),
                last_publish_ack=_optional_float(data.get("last_publish_ack")),
                last_publish_ack_monotonic=_optional_float(data.get("last_publish_ack_monotonic")),
                last_error=None if data.get("last_error") is None else str(data["last_error"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or invalid field {exc}") from None


def _optional_float(value) -> Optional[float]:
    return None if value is None else float(value)


class AgentStateWriter:
    """Keeps the state file of the running agent current without writing to flash on every step."""

    def __init__(
        self,
        path: Path,
        boot_id: str,
        device_id: str,
        broker: str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._monotonic = monotonic
        self._started = clock()
        self._identity = {"pid": os.getpid(), "boot_id": boot_id, "device_id": device_id, "broker": broker}
        self._written_key: Optional[tuple] = None
        self._written_at: Optional[float] = None
        self._last_error_logged: Optional[float] = None

    def update(self, state: str, last_publish_ack: Optional[float], last_error: Optional[str]) -> bool:
        """Write the state file when something a technician would notice changed; return whether it wrote."""
        now_monotonic = self._monotonic()
        key = (state, last_error, last_publish_ack is None)
        heartbeat_due = self._written_at is None or now_monotonic - self._written_at >= HEARTBEAT_S
        if key == self._written_key and not heartbeat_due:
            return False
        return self._write(state, last_publish_ack, last_error, key)

    def stopped(self, last_publish_ack: Optional[float], last_error: Optional[str]) -> None:
        self._write("stopped", last_publish_ack, last_error, ("stopped",))

    def _write(self, state: str, last_publish_ack: Optional[float], last_error: Optional[str], key: tuple) -> bool:
        now, now_monotonic = self._clock(), self._monotonic()
        ack_monotonic = None if last_publish_ack is None else now_monotonic - max(0.0, now - last_publish_ack)
        snapshot = AgentState(
            state=state,
            started=self._started,
            updated=now,
            updated_monotonic=now_monotonic,
            version=__version__,
            last_publish_ack=last_publish_ack,
            last_publish_ack_monotonic=ack_monotonic,
            last_error=last_error,
            **self._identity,
        )
        try:
            _replace_file(self.path, json.dumps(snapshot.to_dict(), sort_keys=True).encode("utf-8"))
        except OSError as exc:
            self._log_write_error(exc, now_monotonic)
            return False
        self._written_key = key
        self._written_at = now_monotonic
        return True

    def _log_write_error(self, exc: OSError, now_monotonic: float) -> None:
        if self._last_error_logged is not None and now_monotonic - self._last_error_logged < WRITE_ERROR_LOG_INTERVAL_S:
            return
        self._last_error_logged = now_monotonic
        logger.warning(
            "cannot write the agent state file %s: %s; 'edge-agent diagnose' will not see the service state",
            self.path, exc.strerror or exc,
        )


def _replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically, so that a reader never sees half a file."""
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # Not secret: the snapshot carries no key material, and technicians read it without root.
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except OSError:
            pass
        raise


def read_agent_state(path: Path) -> Optional[AgentState]:
    """Read the state file; return None when it does not exist, raise ``ValueError`` when it is unreadable."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not contain a JSON object")
    return AgentState.from_dict(data)


def process_is_agent(pid: int, proc_root: Path = Path("/proc")) -> bool:
    """Tell whether ``pid`` is alive and, where /proc shows its command line, is edge-agent.

    The command line check keeps a recycled pid of another program from
    passing as the agent after a crash.
    """
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True  # the console inside the service reads the state file of its own process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    try:
        cmdline = (Path(proc_root) / str(pid) / "cmdline").read_bytes()
    except OSError:
        return True
    return b"edge-agent" in cmdline or b"edge_agent" in cmdline
