"""Reconnect backoff: full jitter under a doubling cap, reset only by a stable session."""

from edge_agent.backoff import STABLE_SESSION_S, Backoff
from edge_agent.config import ReconnectConfig

SETTINGS = ReconnectConfig(min_delay_s=1.0, max_delay_s=10.0)


def test_cap_doubles_up_to_max():
    backoff = Backoff(SETTINGS, rng=lambda: 1.0)

    delays = [backoff.next_delay() for _ in range(6)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_delay_is_uniform_below_cap():
    draws = iter([0.5, 0.25])
    backoff = Backoff(SETTINGS, rng=lambda: next(draws))

    assert backoff.next_delay() == 0.5
    assert backoff.next_delay() == 0.5


def test_delay_has_floor():
    backoff = Backoff(SETTINGS, rng=lambda: 0.0)

    assert backoff.next_delay() == 0.1


def test_slowdown_stretches_delay():
    backoff = Backoff(SETTINGS, rng=lambda: 1.0)

    assert backoff.next_delay(slowdown=3.0) == 3.0


def test_short_session_keeps_growing():
    backoff = Backoff(SETTINGS, rng=lambda: 1.0)
    backoff.next_delay()
    backoff.next_delay()

    assert backoff.after_session(0.5) == 4.0


def test_stable_session_resets():
    backoff = Backoff(SETTINGS, rng=lambda: 1.0)
    for _ in range(5):
        backoff.next_delay()

    assert backoff.after_session(STABLE_SESSION_S) == 1.0
