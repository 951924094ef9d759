"""Polling helper for tests that wait on real processes and brokers."""

import time


def wait_until(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` every 50 ms; raise ``AssertionError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
