"""systemd's notification protocol (``sd_notify``) without libsystemd.

Outside systemd ``NOTIFY_SOCKET`` is unset and every call does nothing. The
watchdog interval comes from ``WATCHDOG_USEC``, and applies only when
``WATCHDOG_PID`` is unset or names this process.
"""

import logging
import os
import socket
import time
from typing import Optional

logger = logging.getLogger(__name__)


class Notifier:
    """Sends READY, STATUS, WATCHDOG and STOPPING datagrams to the service manager."""

    def __init__(self, environ: Optional[dict] = None) -> None:
        environ = os.environ if environ is None else environ
        self.address = environ.get("NOTIFY_SOCKET") or None
        self.watchdog_interval_s = self._watchdog_interval(environ)
        self._socket: Optional[socket.socket] = None
        self._last_ping = 0.0
        self._last_status: Optional[str] = None
        self._errors = 0

    @staticmethod
    def _watchdog_interval(environ) -> Optional[float]:
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            value = int(usec)
        except ValueError:
            logger.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
            return None
        return value / 1_000_000 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, message: str) -> bool:
        """Send one notification; return False when there is no manager or the send failed."""
        if self.address is None:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode("utf-8"), target)
        except OSError as exc:
            self._errors += 1
            if self._errors in (1, 10, 100) or self._errors % 1000 == 0:
                logger.warning("sd_notify to %s failed (%d times so far): %s", self.address, self._errors, exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")
        self._last_status = status

    def status(self, status: str) -> None:
        if status != self._last_status:
            self.send(f"STATUS={status}")
            self._last_status = status

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self, now: Optional[float] = None) -> None:
        """Ping the watchdog at twice the rate systemd requires; callers ping only while making progress."""
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog_interval_s / 2:
            self.send("WATCHDOG=1")
            self._last_ping = now

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
