"""Reconnect discipline: exponential backoff with full jitter and a cap.

Each failed attempt doubles the cap, from ``min_delay_s`` up to
``max_delay_s``. The delay is drawn uniformly below the cap, so a fleet that
lost the same broker spreads its reconnects over the whole window instead of
arriving in one burst. A session counts as a success only once it
has lasted ``STABLE_SESSION_S``. A broker that accepts the connection and
then drops it (a duplicate client id, an authorisation failure) therefore
keeps the delay growing like any other failure.
"""

import random
from typing import Callable

from edge_agent.config import ReconnectConfig

# A session that lasted this long resets the backoff.
STABLE_SESSION_S = 30.0

# The delay never falls below this fraction of ``min_delay_s``, so a draw
# close to zero cannot turn into an immediate retry.
FLOOR_FRACTION = 0.1


class Backoff:
    """Exponential backoff with full jitter: a uniform delay under a cap that doubles per failure."""

    def __init__(self, settings: ReconnectConfig, rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.failures = 0
        self._rng = rng

    def cap(self) -> float:
        """Return the upper bound of the next delay in seconds."""
        return min(self.settings.max_delay_s, self.settings.min_delay_s * (2 ** min(self.failures, 32)))

    def next_delay(self, slowdown: float = 1.0) -> float:
        """Return the delay before the next attempt after a failed one; ``slowdown`` stretches it (thermal)."""
        cap = self.cap()
        self.failures += 1
        return max(self.settings.min_delay_s * FLOOR_FRACTION, self._rng() * cap) * slowdown

    def after_session(self, session_s: float, slowdown: float = 1.0) -> float:
        """Return the delay before reconnecting after a session of ``session_s`` seconds ended."""
        if session_s >= STABLE_SESSION_S:
            self.reset()
        return self.next_delay(slowdown)

    def reset(self) -> None:
        self.failures = 0
