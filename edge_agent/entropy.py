"""Readiness of the kernel random generator, checked before every TLS handshake.

The readiness test is a non-blocking ``getrandom``: it raises
``BlockingIOError`` while the kernel CRNG is not initialised.

``entropy_avail`` is an entropy estimate only on kernels whose input pool is
larger than 256 bits (``poolsize`` 4096 before the random.c rework of Linux
5.18). The rework, also backported to stable kernels, has a 256-bit pool
(``poolsize`` 256). Its counter was drained at every reseed in 5.18, and
later kernels show the seeding progress there, which stays at 256 once the
CRNG is seeded. Neither is an estimate, so on those kernels the profile's
threshold is not applied and the status reports that instead.

A handshake that finds the generator not ready waits with backoff up to
``entropy.wait_max_s`` and is then abandoned, to be retried later. It never
proceeds while the probe reports the generator unseeded.
"""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from edge_agent.config import EntropyConfig
from edge_agent.errors import EdgeAgentError

logger = logging.getLogger(__name__)

# poolsize of the BLAKE2s input pool (Linux 5.18 and the stable kernels that took the rework).
FIXED_POOL_BITS = 256
FIRST_WAIT_S = 0.1
MAX_WAIT_S = 5.0
# While one handshake waits, a progress line is logged at most this often.
WAIT_LOG_INTERVAL_S = 30.0

Probe = Callable[[], Optional[bool]]


class EntropyNotReadyError(EdgeAgentError):
    """The kernel random generator did not become ready within ``entropy.wait_max_s``."""


def crng_ready() -> Optional[bool]:
    """Return True when ``getrandom`` would not block, False when it would, None where it cannot be asked."""
    getrandom = getattr(os, "getrandom", None)
    if getrandom is None:
        # Python has os.getrandom on Linux only.
        return None
    try:
        getrandom(1, os.GRND_NONBLOCK)
    except BlockingIOError:
        return False
    except OSError:
        # ENOSYS: a kernel older than 3.17 has no getrandom system call.
        return None
    return True


@dataclass(frozen=True)
class EntropyStatus:
    """One reading of the kernel random generator's state.

    ``entropy_avail_mode`` is ``measured`` (a pool larger than 256 bits, so the
    threshold applies), ``fixed`` (the 256-bit pool of newer kernels, whose
    counter is no estimate) or ``unavailable`` (the files cannot be read).
    """

    ready: bool
    crng_ready: Optional[bool]
    entropy_avail: Optional[int]
    poolsize: Optional[int]
    entropy_avail_mode: str
    min_entropy_bits: int
    detail: str

    @property
    def estimate_meaningful(self) -> bool:
        return self.entropy_avail_mode == "measured"

    def to_dict(self) -> dict:
        return {
            "ready": self.ready,
            "crng_ready": self.crng_ready,
            "entropy_avail": self.entropy_avail,
            "poolsize": self.poolsize,
            "entropy_avail_mode": self.entropy_avail_mode,
            "min_entropy_bits": self.min_entropy_bits,
            "detail": self.detail,
        }


def read_entropy_status(settings: EntropyConfig, probe: Probe = crng_ready) -> EntropyStatus:
    """Probe the CRNG and read ``entropy_avail`` and ``poolsize`` below ``settings.proc_root``."""
    crng = probe()
    folder = Path(settings.proc_root) / "sys/kernel/random"
    avail = _read_int(folder / "entropy_avail")
    poolsize = _read_int(folder / "poolsize")
    mode = _entropy_avail_mode(avail, poolsize)
    minimum = settings.min_entropy_bits

    if crng is False:
        ready, detail = False, "kernel CRNG not initialised (getrandom would block)"
    elif mode == "measured":
        ready = avail >= minimum
        relation = "at or above" if ready else "below"
        detail = f"entropy_avail {avail} bits (pool {poolsize}) is {relation} entropy.min_entropy_bits {minimum}"
    elif mode == "fixed":
        ready, detail = _fixed_pool_readiness(crng, avail)
    elif crng is None:
        # NOTE: without getrandom and without the /proc files (non-Linux) readiness cannot be
        # checked, so the operating system's generator is assumed to be seeded.
        ready, detail = True, "getrandom is not available and entropy_avail is not readable; readiness not checked"
    else:
        ready, detail = True, f"CRNG ready; entropy_avail or poolsize is not readable in {folder}"
    return EntropyStatus(ready, crng, avail, poolsize, mode, minimum, detail)


def _fixed_pool_readiness(crng: Optional[bool], avail: int) -> "tuple[bool, str]":
    if crng is None:
        # getrandom cannot be asked (a seccomp filter, say). After 5.18 the counter reaches 256
        # when the CRNG is seeded. On 5.18 it also drops after each reseed, which errs towards waiting.
        if avail < FIXED_POOL_BITS:
            return False, f"entropy_avail {avail} of 256: the kernel CRNG is still being seeded"
        return True, "entropy_avail reached 256, so the kernel CRNG is seeded (getrandom not available to ask)"
    return True, (
        f"CRNG ready; entropy_avail is fixed at {avail} on this kernel's 256-bit pool and is not an estimate, "
        "so entropy.min_entropy_bits does not apply"
    )


def _read_int(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _entropy_avail_mode(avail: Optional[int], poolsize: Optional[int]) -> str:
    if avail is None or poolsize is None:
        return "unavailable"
    if poolsize > FIXED_POOL_BITS:
        return "measured"
    return "fixed"


@dataclass(frozen=True)
class Admission:
    """The gate's decision for one handshake: go ahead, ask again after ``retry_in_s``, or give up."""

    ready: bool
    gave_up: bool
    retry_in_s: float
    status: EntropyStatus


@dataclass
class _Wait:
    started: float
    next_pause_s: float
    logged_at: float
    probes: int = 0


class EntropyGate:
    """Decides whether a TLS handshake may start now, with a bounded wait per purpose.

    ``admit`` returns at once, so the agent's loop keeps sampling and feeding
    the watchdog while a handshake waits. ``wait_until_ready`` and
    ``ensure_ready`` block, for one-shot commands.
    """

    def __init__(
        self,
        settings: EntropyConfig,
        probe: Probe = crng_ready,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self._sleep = sleep
        self._clock = clock
        self._waits: Dict[str, _Wait] = {}
        self.last_status: Optional[EntropyStatus] = None
        self.waits = 0
        self.failures = 0

    def status(self) -> EntropyStatus:
        """Read the generator state now."""
        self.last_status = read_entropy_status(self.settings, self.probe)
        return self.last_status

    def admit(self, purpose: str, peer: str = "") -> Admission:
        """Check whether the handshake for ``purpose`` may start now.

        ``purpose`` names the handshake ("connection", "verification", ...); each
        purpose has its own bounded wait. When ``gave_up`` is set the attempt
        is over and the caller schedules a new one later.
        """
        status = self.status()
        now = self._clock()
        what = f"TLS handshake for the {purpose}" + (f" to {peer}" if peer else "")
        wait = self._waits.get(purpose)

        if status.ready:
            if wait is not None:
                del self._waits[purpose]
                logger.info("kernel random generator ready after %.1f s; %s proceeds", now - wait.started, what)
            return Admission(True, False, 0.0, status)

        if wait is None:
            wait = _Wait(started=now, next_pause_s=FIRST_WAIT_S, logged_at=now)
            self._waits[purpose] = wait
            logger.warning("delaying %s: %s; waiting up to %g s (entropy.wait_max_s)", what, status.detail, self.settings.wait_max_s)
        elif now - wait.logged_at >= WAIT_LOG_INTERVAL_S:
            wait.logged_at = now
            logger.warning("still delaying %s after %.0f s (%d checks): %s", what, now - wait.started, wait.probes, status.detail)

        elapsed = now - wait.started
        if elapsed >= self.settings.wait_max_s:
            del self._waits[purpose]
            self.failures += 1
            logger.error(
                "%s abandoned: %s after %.1f s (entropy.wait_max_s = %g); the attempt is retried later",
                what, status.detail, elapsed, self.settings.wait_max_s,
            )
            return Admission(False, True, 0.0, status)

        pause = min(wait.next_pause_s, self.settings.wait_max_s - elapsed)
        wait.next_pause_s = min(wait.next_pause_s * 2, MAX_WAIT_S)
        wait.probes += 1
        self.waits += 1
        return Admission(False, False, pause, status)

    def wait_until_ready(self, purpose: str, peer: str = "") -> bool:
        """Block until the generator is ready or ``wait_max_s`` passes; return whether the handshake may start."""
        while True:
            admission = self.admit(purpose, peer)
            if admission.ready:
                return True
            if admission.gave_up:
                return False
            self._sleep(admission.retry_in_s)

    def ensure_ready(self, purpose: str, peer: str = "") -> None:
        """Block like ``wait_until_ready``; raise ``EntropyNotReadyError`` with the fix when it gives up."""
        if self.wait_until_ready(purpose, peer):
            return
        detail = self.last_status.detail if self.last_status else "state unknown"
        raise EntropyNotReadyError(
            f"kernel random generator not ready after {self.settings.wait_max_s:g} s ({detail}); "
            "no TLS handshake was made. Check that a hardware RNG driver is loaded or a random seed "
            "is restored at boot, then retry; entropy.wait_max_s sets how long to wait"
        )

    def to_dict(self) -> dict:
        """Return the current state and the wait counters for telemetry and ``diagnose``."""
        return {
            **self.status().to_dict(),
            "waits": self.waits,
            "failures": self.failures,
            "waiting_for": sorted(self._waits),
        }
