"""Readiness of the kernel random generator, checked before every TLS handshake.

The test is a non-blocking ``getrandom``: it raises ``BlockingIOError`` while
the kernel CRNG is not initialised, the same probe systemd's random-seed uses.
Since Linux 5.18 ``entropy_avail`` always reads 256, so the pool estimate is
applied only on kernels where it still moves.
"""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from edge_agent.config import EntropyConfig

logger = logging.getLogger(__name__)

# Linux 5.18 and later report this constant whatever the pool state.
_FIXED_ENTROPY_AVAIL = 256


@dataclass(frozen=True)
class EntropyStatus:
    """One reading of the generator state."""

    crng_ready: bool
    entropy_avail: Optional[int]
    estimate_meaningful: bool
    ready: bool
    detail: str

    def to_dict(self) -> dict:
        return {
            "ready": self.ready,
            "crng_ready": self.crng_ready,
            "entropy_avail": self.entropy_avail,
            "estimate_meaningful": self.estimate_meaningful,
            "detail": self.detail,
        }


def crng_ready() -> bool:
    """Return True when ``getrandom`` would not block."""
    getrandom = getattr(os, "getrandom", None)
    if getrandom is None:
        # NOTE: without getrandom (non-Linux) the OS generator is assumed seeded.
        return True
    try:
        getrandom(1, os.GRND_NONBLOCK)
    except BlockingIOError:
        return False
    return True


class EntropyGate:
    """Decides whether a TLS handshake may start now, and waits for it with backoff."""

    def __init__(
        self,
        settings: EntropyConfig,
        probe: Callable[[], bool] = crng_ready,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._probe = probe
        self._sleep = sleep
        self._clock = clock
        self.last_status: Optional[EntropyStatus] = None
        self.waits = 0
        self.failures = 0

    def _read_entropy_avail(self) -> Optional[int]:
        path = Path(self.settings.proc_root) / "sys/kernel/random/entropy_avail"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _read_pool_size(self) -> Optional[int]:
        path = Path(self.settings.proc_root) / "sys/kernel/random/poolsize"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def status(self) -> EntropyStatus:
        ready = self._probe()
        avail = self._read_entropy_avail()
        # A 256-bit pool that reads exactly 256 is the fixed value of newer kernels, not a measurement.
        meaningful = avail is not None and not (avail == _FIXED_ENTROPY_AVAIL and self._read_pool_size() == _FIXED_ENTROPY_AVAIL)

        if not ready:
            detail = "kernel CRNG not initialised (getrandom would block)"
            overall = False
        elif meaningful and avail < self.settings.min_entropy_bits:
            detail = f"entropy_avail {avail} bits is below the minimum {self.settings.min_entropy_bits}"
            overall = False
        elif meaningful:
            detail = f"CRNG ready, entropy_avail {avail} bits"
            overall = True
        else:
            detail = "CRNG ready; entropy_avail is fixed at 256 on this kernel, so it is not measured"
            overall = True

        status = EntropyStatus(ready, avail, meaningful, overall, detail)
        self.last_status = status
        return status

    def wait_until_ready(self, label: str = "TLS handshake") -> bool:
        """Block until the generator is ready or ``wait_max_s`` passes; return readiness.

        The wait between probes doubles from 0.1 s up to 5 s. A False return
        means the caller must skip this handshake attempt and retry later.
        """
        deadline = self._clock() + self.settings.wait_max_s
        delay = 0.1
        while True:
            status = self.status()
            if status.ready:
                return True
            remaining = deadline - self._clock()
            if remaining <= 0:
                self.failures += 1
                logger.error(
                    "entropy not ready after %.1f s before %s: %s; this attempt is abandoned and retried later",
                    self.settings.wait_max_s, label, status.detail,
                )
                return False
            pause = min(delay, remaining)
            self.waits += 1
            logger.warning("delaying %s by %.1f s: %s", label, pause, status.detail)
            self._sleep(pause)
            delay = min(delay * 2, 5.0)
