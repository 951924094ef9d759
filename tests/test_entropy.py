"""The entropy gate: CRNG probe, entropy_avail under a fake /proc, bounded waits with a test clock.

A fake proc tree cannot model getrandom, so the CRNG probe is injected;
entropy_avail and poolsize are always read from files the test writes.
"""

import logging
import os
from pathlib import Path

import pytest

from edge_agent.config import EntropyConfig
from edge_agent.entropy import EntropyGate, EntropyNotReadyError, crng_ready, read_entropy_status
from fakehw import FakeProc


class TestClock:
    """A monotonic clock that only moves when the gate sleeps."""

    __test__ = False

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = []
        self.on_sleep = None

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))


@pytest.fixture
def proc(tmp_path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def make_gate(proc: FakeProc, clock: TestClock, probe=lambda: True, **settings) -> EntropyGate:
    config = EntropyConfig(proc_root=proc.root, **settings)
    return EntropyGate(config, probe=probe, sleep=clock.sleep, clock=clock)


# --- status -------------------------------------------------------------------


def test_this_kernel_probe_ready():
    # The machine running the tests has long been seeded.
    assert crng_ready() is True


def test_fixed_pool_not_measured(proc):
    proc.set(entropy_avail=256, poolsize=256)

    status = read_entropy_status(EntropyConfig(proc_root=proc.root, min_entropy_bits=1024), probe=lambda: True)

    assert status.ready is True
    assert status.entropy_avail_mode == "fixed"
    assert "does not apply" in status.detail


def test_old_kernel_threshold_applies(proc):
    proc.set(entropy_avail=180, poolsize=4096)

    status = read_entropy_status(EntropyConfig(proc_root=proc.root, min_entropy_bits=256), probe=lambda: True)

    assert status.ready is False
    assert status.entropy_avail_mode == "measured"
    assert "entropy_avail 180 bits (pool 4096) is below entropy.min_entropy_bits 256" in status.detail


def test_old_kernel_enough_entropy(proc):
    proc.set(entropy_avail=3100, poolsize=4096)

    status = read_entropy_status(EntropyConfig(proc_root=proc.root, min_entropy_bits=256), probe=lambda: True)

    assert status.ready is True
    assert status.entropy_avail == 3100


def test_fixed_pool_below_256_still_fixed(proc):
    # Before seeding, a 256-bit-pool kernel counts up to 256: progress, not a pool estimate.
    proc.set(entropy_avail=96, poolsize=256)

    status = read_entropy_status(EntropyConfig(proc_root=proc.root), probe=lambda: False)

    assert status.entropy_avail_mode == "fixed"
    assert status.ready is False
    assert "getrandom would block" in status.detail


def test_probe_not_ready_blocks(proc):
    proc.set(entropy_avail=4096, poolsize=4096)

    status = read_entropy_status(EntropyConfig(proc_root=proc.root), probe=lambda: False)

    assert status.ready is False


def test_no_getrandom_uses_seeding_counter(proc):
    proc.set(entropy_avail=200, poolsize=256)
    settings = EntropyConfig(proc_root=proc.root)

    assert read_entropy_status(settings, probe=lambda: None).ready is False
    proc.set(entropy_avail=256, poolsize=256)
    assert read_entropy_status(settings, probe=lambda: None).ready is True


def test_missing_proc_files_unavailable(proc):
    status = read_entropy_status(EntropyConfig(proc_root=proc.root), probe=lambda: True)

    assert status.entropy_avail_mode == "unavailable"
    assert status.entropy_avail is None
    assert status.ready is True


def test_real_proc_matches_kernel():
    # Kernels with the 256-bit pool report poolsize 256; older kernels report 4096.
    poolsize = int(Path("/proc/sys/kernel/random/poolsize").read_text())
    status = read_entropy_status(EntropyConfig())

    expected = "fixed" if poolsize == 256 else "measured"
    assert status.entropy_avail_mode == expected


# --- waiting --------------------------------------------------------------------


def test_gate_delays_until_ready(proc):
    proc.set(entropy_avail=64, poolsize=4096)
    clock = TestClock()
    gate = make_gate(proc, clock, min_entropy_bits=256, wait_max_s=60.0)
    clock.on_sleep = lambda count: proc.set(entropy_avail=512, poolsize=4096) if count == 4 else None

    assert gate.wait_until_ready("connection", "broker:8883") is True
    assert clock.sleeps == [0.1, 0.2, 0.4, 0.8]
    assert gate.waits == 4
    assert gate.failures == 0


def test_gate_gives_up_at_bound(proc, caplog):
    proc.set(entropy_avail=256, poolsize=256)
    clock = TestClock()
    gate = make_gate(proc, clock, probe=lambda: False, wait_max_s=20.0)

    assert gate.wait_until_ready("connection", "broker:8883") is False

    assert sum(clock.sleeps) == pytest.approx(20.0)
    assert max(clock.sleeps) == 5.0
    assert gate.failures == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "TLS handshake for the connection to broker:8883 abandoned" in errors[0].getMessage()
    assert "entropy.wait_max_s = 20" in errors[0].getMessage()


def test_gate_wait_logs_rate_limited(proc, caplog):
    proc.set(entropy_avail=256, poolsize=256)
    clock = TestClock()
    gate = make_gate(proc, clock, probe=lambda: False, wait_max_s=120.0)

    gate.wait_until_ready("verification")

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(clock.sleeps) > 20
    assert 2 <= len(warnings) <= 5
    assert warnings[0].startswith("delaying TLS handshake for the verification")


def test_gate_zero_bound_never_waits(proc):
    proc.set(entropy_avail=256, poolsize=256)
    clock = TestClock()
    gate = make_gate(proc, clock, probe=lambda: False, wait_max_s=0.0)

    admission = gate.admit("connection")

    assert admission.gave_up is True
    assert clock.sleeps == []


def test_admit_never_blocks(proc):
    proc.set(entropy_avail=256, poolsize=256)
    clock = TestClock()
    gate = make_gate(proc, clock, probe=lambda: False, wait_max_s=60.0)

    first = gate.admit("connection")
    clock.now += first.retry_in_s
    second = gate.admit("connection")

    assert first.ready is False
    assert first.gave_up is False
    assert second.retry_in_s == 2 * first.retry_in_s
    assert clock.sleeps == []


def test_purposes_wait_separately(proc):
    proc.set(entropy_avail=256, poolsize=256)
    clock = TestClock()
    gate = make_gate(proc, clock, probe=lambda: False, wait_max_s=10.0)

    gate.admit("connection")
    clock.now += 9.0
    late = gate.admit("verification")

    assert late.gave_up is False
    assert gate.to_dict()["waiting_for"] == ["connection", "verification"]


def test_ensure_ready_raises_with_fix(proc):
    proc.set(entropy_avail=256, poolsize=256)
    clock = TestClock()
    gate = make_gate(proc, clock, probe=lambda: False, wait_max_s=1.0)

    with pytest.raises(EntropyNotReadyError) as info:
        gate.ensure_ready("pin check", "broker:8883")

    message = str(info.value)
    assert "not ready after 1 s" in message
    assert "no TLS handshake was made" in message
    assert "entropy.wait_max_s" in message


def test_gate_report_for_telemetry(proc):
    proc.set(entropy_avail=256, poolsize=256)
    clock = TestClock()
    gate = make_gate(proc, clock)

    report = gate.to_dict()

    assert report["ready"] is True
    assert report["entropy_avail_mode"] == "fixed"
    assert report["waits"] == 0
    assert report["waiting_for"] == []


@pytest.mark.skipif(not hasattr(os, "getrandom"), reason="os.getrandom exists on Linux only")
def test_probe_not_ready_on_blocking(monkeypatch):
    def blocking(size, flags):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "getrandom", blocking)

    assert crng_ready() is False
