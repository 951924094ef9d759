"""Telemetry messages: psutil system readings plus the agent's own health, as JSON.

Each message carries the device id, a UTC timestamp, the kernel boot id and
a per-boot sequence number, so the receiving side can order messages and
drop duplicates that at-least-once delivery may produce. A reading that the
spool could not store has no sequence number (``seq`` is null).
"""

import datetime
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import psutil

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def read_boot_id(path: Path = _BOOT_ID_PATH) -> str:
    """Return the kernel's boot id, or a random one where the kernel has none (non-Linux)."""
    try:
        return path.read_text().strip()
    except OSError:
        return str(uuid.uuid4())


def telemetry_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/telemetry"


def status_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/status"


def utc_timestamp(now: Optional[float] = None) -> str:
    moment = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SystemSampler:
    """Collects system readings with psutil; a reading that fails is left out, not faked."""

    def __init__(self, disk_path: Path = Path("/")) -> None:
        self.disk_path = disk_path
        # The first cpu_percent call only sets the reference point.
        psutil.cpu_percent(interval=None)

    def sample(self) -> Dict[str, Any]:
        readings: Dict[str, Any] = {}
        self._add(readings, "cpu_percent", lambda: psutil.cpu_percent(interval=None))
        self._add(readings, "load_avg", lambda: [round(v, 2) for v in psutil.getloadavg()])
        self._add(readings, "memory", self._memory)
        self._add(readings, "disk", self._disk)
        self._add(readings, "network", self._network)
        self._add(readings, "uptime_s", lambda: round(time.time() - psutil.boot_time(), 1))
        return readings

    @staticmethod
    def _add(readings: Dict[str, Any], name: str, read: Callable[[], Any]) -> None:
        try:
            readings[name] = read()
        except (OSError, AttributeError, RuntimeError) as exc:
            logger.debug("system reading %s failed: %s", name, exc)

    @staticmethod
    def _memory() -> Dict[str, Any]:
        memory = psutil.virtual_memory()
        return {"total": memory.total, "available": memory.available, "percent": memory.percent}

    def _disk(self) -> Dict[str, Any]:
        usage = psutil.disk_usage(str(self.disk_path))
        return {"path": str(self.disk_path), "total": usage.total, "free": usage.free, "percent": usage.percent}

    @staticmethod
    def _network() -> Dict[str, Any]:
        counters = psutil.net_io_counters()
        return {
            "bytes_sent": counters.bytes_sent,
            "bytes_recv": counters.bytes_recv,
            "errin": counters.errin,
            "errout": counters.errout,
        }


def build_message(
    device_id: str,
    boot_id: str,
    sequence: Optional[int],
    system: Dict[str, Any],
    agent: Dict[str, Any],
    now: Optional[float] = None,
) -> bytes:
    document = {
        "schema": SCHEMA_VERSION,
        "device_id": device_id,
        "ts": utc_timestamp(now),
        "boot_id": boot_id,
        "seq": sequence,
        "system": system,
        "agent": agent,
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")
