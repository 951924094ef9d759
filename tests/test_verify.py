"""The periodic verification and the thermal and entropy throttles against a real Mosquitto.

Temperatures come from a fake sysfs tree and the CRNG probe is injected;
everything else (identity files, TLS, the pin check, the broker) is real.
"""

import base64
import dataclasses
import datetime
import hashlib
import logging
import threading
import time
from pathlib import Path

import pytest

from edge_agent import verify
from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.devpki import issue_idevid, make_ca, write_certificates, write_private_key
from edge_agent.entropy import EntropyGate
from edge_agent.identity import load_identity
from edge_agent.thermal import ThermalGovernor
from edge_agent.tls import create_client_context
from edge_agent.verify import Verifier, check_broker, check_identity
from fakehw import FakeProc, FakeSysfs
from waiting import wait_until

UTC = datetime.timezone.utc
# A well-formed pin that matches no key of the test PKI.
UNRELATED_PIN = "sha256//" + base64.b64encode(hashlib.sha256(b"no such key").digest()).decode()


def connect_seen(log: str) -> bool:
    """Return whether the broker log shows an MQTT CONNECT (not just a TCP/TLS connection)."""
    return "CONNECT" in log.replace("DISCONNECT", "") or "Received" in log


def broker_log_after(broker, connections: int) -> str:
    """Return the broker log once it shows ``connections`` closed TLS connections.

    Mosquitto writes its log from its own event loop, so a line can appear
    after the client has already returned. The negative checks need every
    line of each connection first.
    """
    wait_until(
        lambda: broker.log().count("closed its connection") + broker.log().count("disconnected") >= connections,
        what=f"{connections} closed connections in the broker log",
        timeout_s=20.0,
    )
    return broker.log()


@pytest.fixture
def hot_sysfs(tmp_path) -> Path:
    """A fake sysfs tree whose CPU zone reads 95 C, above every profile's critical threshold."""
    sysfs = FakeSysfs(tmp_path / "sys")
    sysfs.zone(0, "cpu-thermal", "95000")
    return sysfs.root


@pytest.fixture
def seeded_proc(tmp_path) -> Path:
    """A fake /proc with the 256-bit pool of current kernels."""
    return FakeProc(tmp_path / "proc").set(entropy_avail=256, poolsize=256).root


@pytest.fixture
def agents():
    """Agents a test drives step by step, without ``run``; each is shut down at the end."""
    created = []
    yield created
    for agent in created:
        agent.shutdown()


class FlippingProbe:
    """A CRNG probe that reports not ready until the test flips it."""

    def __init__(self) -> None:
        self.seeded = threading.Event()
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.seeded.is_set()


def new_agent(config_path: Path) -> Agent:
    return Agent(load_config(config_path))


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(UTC)


# --- the broker probe ----------------------------------------------------------


def test_probe_verifies_pinned_broker(broker, write_config, pki):
    config = load_config(write_config(broker.port))
    context = create_client_context(config.broker, load_identity(config.identity))

    finding = check_broker(config.broker, context)

    assert finding.valid, finding.detail
    assert finding.pin_matched is True
    assert finding.pin == str(pki.broker_pin)
    assert 800 < finding.expiry.days_left(now_utc()) < 830
    log = broker_log_after(broker, 1)
    assert "New connection from" in log
    assert not connect_seen(log)


def test_probe_rejects_wrong_pin(broker, write_config, pki):
    config = load_config(write_config(broker.port, broker={"pins": [str(pki.spare_pin), UNRELATED_PIN]}))
    context = create_client_context(config.broker, load_identity(config.identity))

    finding = check_broker(config.broker, context)

    assert not finding.valid
    assert finding.pin_matched is False
    assert finding.failure_class == "pin-mismatch"
    assert str(pki.broker_pin) in finding.detail
    assert context.pin_failures == 1
    log = broker_log_after(broker, 1)
    assert "New connection from" in log
    assert not connect_seen(log)


def test_probe_reports_unreachable_broker(write_config):
    from edge_agent.devbroker import free_port

    config = load_config(write_config(free_port()))
    context = create_client_context(config.broker, load_identity(config.identity))

    finding = check_broker(config.broker, context)

    assert not finding.valid
    assert finding.failure_class == "refused"
    assert finding.detail.startswith(f"broker 127.0.0.1:{config.broker.port}: refused")


# --- the identity re-check --------------------------------------------------------


def test_identity_never_expiring(write_config):
    config = load_config(write_config())

    finding = check_identity(config.identity, None, now_utc())

    assert finding.valid, finding.detail
    # The development IDevID never expires; the manufacturer CA does, in about ten years.
    assert "manufacturer CA" in finding.expiry.subject
    assert finding.expiry.days_left(now_utc()) > 3000


def test_identity_expiring_soon(tmp_path, write_config):
    folder = tmp_path / "short"
    folder.mkdir()
    ca = make_ca("short-lived manufacturer CA")
    device = issue_idevid(ca, "GW-SHORT", not_after=now_utc() + datetime.timedelta(days=10))
    cert = write_certificates(folder / "idevid.pem", [device.certificate])
    key = write_private_key(folder / "idevid.key", device.key)
    anchor = write_certificates(folder / "ca.pem", [ca.certificate])
    config = load_config(write_config(identity={"cert": str(cert), "key": str(key), "trust_anchors": [str(anchor)]}))

    finding = check_identity(config.identity, None, now_utc())

    assert finding.valid
    assert 9 < finding.expiry.days_left(now_utc()) < 10.1
    assert "GW-SHORT" in finding.expiry.subject


def test_identity_expired_reported(write_config):
    config = load_config(write_config())

    finding = check_identity(config.identity, None, now_utc() + datetime.timedelta(days=20 * 365))

    # identity.strict_time is false: an expired CA is reported but still accepted.
    assert finding.valid
    assert "expired on" in finding.detail
    assert finding.expiry.days_left(now_utc() + datetime.timedelta(days=20 * 365)) < 0


def test_identity_expired_strict_invalid(write_config):
    config = load_config(write_config(identity={"strict_time": True}))

    finding = check_identity(config.identity, None, now_utc() + datetime.timedelta(days=20 * 365))

    assert not finding.valid
    assert "expired on" in finding.detail


def test_identity_wrong_anchor_invalid(tmp_path, write_config):
    stranger = write_certificates(tmp_path / "stranger.pem", [make_ca("unrelated CA").certificate])
    config = load_config(write_config())
    settings = dataclasses.replace(config.identity, trust_anchors=(stranger,))

    finding = check_identity(settings, None, now_utc())

    assert not finding.valid
    assert "IDevID chain:" in finding.detail
    assert "identity.trust_anchors" in finding.detail


# --- the verification job ---------------------------------------------------------


def test_verification_waits_for_entropy(broker, write_config, seeded_proc):
    config = load_config(write_config(broker.port, entropy={"proc_root": str(seeded_proc), "wait_max_s": 30.0}))
    context = create_client_context(config.broker, load_identity(config.identity))
    clock = [100.0]
    probe = FlippingProbe()
    gate = EntropyGate(config.entropy, probe=probe, clock=lambda: clock[0])
    verifier = Verifier(gate, ThermalGovernor(config.thermal), start=0.0, first_run_delay_s=0.0)

    postponed = verifier.run(clock[0], config, context)
    assert postponed is None
    assert verifier.next_due() == pytest.approx(100.1)

    clock[0] += 31.0
    abandoned = verifier.run(clock[0], config, context)
    assert abandoned.result == "failed"
    assert abandoned.broker.checked is False
    assert "kernel CRNG not initialised" in abandoned.broker.detail
    assert "New connection from" not in broker.log()

    probe.seeded.set()
    clock[0] += 3600.0
    report = verifier.run(clock[0], config, context)
    assert report.result == "ok", report.broker.detail
    assert broker_log_after(broker, 1).count("New connection from") == 1


# --- the invariant: the hottest state still checks every pin ---------------------


def connect_when_critical(path: Path, agents: list):
    """Start an agent at the critical state; make one connection attempt and one verification run."""
    agent = new_agent(path)
    agents.append(agent)
    assert agent.thermal.update() == "critical"

    now = time.monotonic()
    agent.try_connect(now)
    return agent, agent.verifier.run(now, agent.config, agent._context)


def test_critical_state_refuses_wrong_pin(broker, write_config, pki, hot_sysfs, agents):
    path = write_config(
        broker.port,
        broker={"pins": [str(pki.spare_pin), UNRELATED_PIN]},
        thermal={"sysfs_root": str(hot_sysfs)},
    )
    agent, report = connect_when_critical(path, agents)

    assert agent.uplink.state == "disconnected"
    assert agent.uplink.counters.pin_failures == 1
    assert report.result == "failed"
    assert report.broker.pin_matched is False
    assert report.thermal_state == "critical"
    log = broker_log_after(broker, 2)
    assert log.count("New connection from") == 2
    assert not connect_seen(log)


def test_critical_state_accepts_right_pin(broker, write_config, pki, hot_sysfs, agents):
    path = write_config(broker.port, thermal={"sysfs_root": str(hot_sysfs)})
    agent, report = connect_when_critical(path, agents)

    assert agent.uplink.state == "connected"
    assert report.result == "ok", report.broker.detail
    assert report.broker.pin_matched is True
    assert f"as {pki.device_serial}" in broker.log() or f"u'{pki.device_serial}'" in broker.log()


def test_critical_state_paces_reconnects(write_config, hot_sysfs, agents):
    from edge_agent.devbroker import free_port

    path = write_config(free_port(), thermal={"sysfs_root": str(hot_sysfs), "critical_reconnect_min_s": 240.0})
    agent = new_agent(path)
    agents.append(agent)
    agent.thermal.update()

    now = time.monotonic()
    agent.try_connect(now)

    assert agent.uplink.counters.connect_failures == 1
    assert agent._schedule.next_connect - now >= 240.0


# --- telemetry ------------------------------------------------------------------------


def test_health_reports_verification(broker, write_config, hot_sysfs, agents, monkeypatch):
    monkeypatch.setattr(verify, "FIRST_RUN_DELAY_S", 0.0)
    agent = new_agent(write_config(broker.port, thermal={"sysfs_root": str(hot_sysfs)}))
    agents.append(agent)

    agent.step(time.monotonic())
    health = agent.health()

    assert health["thermal"]["state"] == "critical"
    assert health["thermal"]["temperature_c"] == 95.0
    assert health["verification"]["result"] == "ok"
    assert health["verification"]["pin_matched"] is True
    assert health["verification"]["thermal_state"] == "critical"
    assert health["verification"]["interval_s"] == agent.config.thermal.verify_interval_s * 24.0
    assert health["verification"]["days_until_expiry"] > 800
    assert health["entropy"]["ready"] is True


# --- the entropy gate in a running agent ---------------------------------------------


def start_in_thread(agent: Agent) -> threading.Thread:
    thread = threading.Thread(target=agent.run, name="agent", daemon=True)
    thread.start()
    return thread


def test_agent_waits_for_entropy(broker, observer, write_config, seeded_proc, caplog):
    caplog.set_level(logging.INFO, logger="edge_agent.entropy")
    path = write_config(broker.port, entropy={"proc_root": str(seeded_proc), "wait_max_s": 120.0})
    agent = new_agent(path)
    probe = FlippingProbe()
    agent.entropy.probe = probe
    thread = start_in_thread(agent)
    try:
        wait_until(lambda: agent.entropy.waits >= 3, what="three entropy waits", timeout_s=20.0)
        assert agent.uplink.state != "connected"
        # Only the observer has connected: the agent has not even opened a TCP connection.
        assert broker.log().count("New connection from") == 1

        probe.seeded.set()
        wait_until(lambda: agent.uplink.state == "connected", what="the connection after seeding", timeout_s=20.0)
        assert observer.wait_for(1, "/telemetry", timeout_s=10)
    finally:
        agent.stop()
        thread.join(timeout=20)

    assert not thread.is_alive()
    assert "delaying TLS handshake for the connection to 127.0.0.1" in caplog.text
    assert "kernel random generator ready after" in caplog.text


def test_agent_survives_entropy_timeout(broker, write_config, seeded_proc, caplog):
    path = write_config(broker.port, entropy={"proc_root": str(seeded_proc), "wait_max_s": 0.3})
    agent = new_agent(path)
    probe = FlippingProbe()
    agent.entropy.probe = probe
    thread = start_in_thread(agent)
    try:
        wait_until(lambda: agent.entropy.failures >= 2, what="two abandoned handshakes", timeout_s=20.0)
        depth_while_waiting = agent.spool.depth
        assert thread.is_alive()
        assert "New connection from" not in broker.log()

        wait_until(lambda: agent.spool.depth > depth_while_waiting, what="telemetry spooled while waiting", timeout_s=20.0)
        probe.seeded.set()
        wait_until(lambda: agent.uplink.state == "connected", what="the connection after seeding", timeout_s=20.0)
    finally:
        agent.stop()
        thread.join(timeout=20)

    abandoned = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert abandoned
    assert "TLS handshake for the connection to 127.0.0.1" in abandoned[0]
    assert "kernel CRNG not initialised" in abandoned[0]
    assert "the attempt is retried later" in abandoned[0]
