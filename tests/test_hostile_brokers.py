"""Hostile brokers are refused before any MQTT byte, and key rotation keeps the fleet connected.

Each broker is a real Mosquitto (or, for a reset, a raw socket server). The
agent makes one connection attempt through ``Agent.try_connect``, the same
path as ``edge-agent run``. The Mosquitto log is the oracle for "no MQTT
byte": a client refused before CONNECT leaves only "New connection from".
"""

import datetime
import logging
import signal
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.devbroker import DevBroker
from pinhelpers import (
    ResetServer,
    create_broker_keys,
    refused_before_mqtt,
    self_signed,
    start_broker,
    tls_record_types,
    wait_for_connections,
    wait_for_text,
)

pytestmark = pytest.mark.broker

UTC = datetime.timezone.utc

# Makes a Mosquitto 2.0 / OpenSSL 3 listener speak TLS 1.1 and nothing else.
TLS11_ONLY_OPENSSL_CONF = """\
openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_section
[ssl_section]
system_default = system_default_section
[system_default_section]
MinProtocol = TLSv1.1
MaxProtocol = TLSv1.1
CipherString = DEFAULT@SECLEVEL=0
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return create_broker_keys(tmp_path_factory.mktemp("broker-keys"))


@pytest.fixture
def pinned_config(write_config, keys):
    def write(port: int, **broker) -> Path:
        return write_config(port, broker={"ca_file": str(keys.ca_file), "pins": keys.pins, **broker})

    return write


def attempt_connect(config_path: Path) -> Agent:
    """Run one connection attempt of the agent, as its main loop does, and stop it."""
    agent = Agent(load_config(config_path))
    try:
        agent.try_connect(time.monotonic())
    finally:
        agent.shutdown()
    return agent


def failure_lines(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if "failed:" in r.getMessage())


def broker_log_after_attempt(broker: DevBroker) -> str:
    """Wait for the readiness probe's connection and the agent's, then return the broker log."""
    return wait_for_connections(broker.log, 2)


# --- the matrix -----------------------------------------------------------


def _ca_valid_other_key(keys):
    return keys.other, [keys.issue(keys.other)]


def _self_signed_right_name(keys):
    # Even the pinned key does not help a certificate that no trusted CA issued.
    return keys.live, [self_signed(keys.live)]


def _expired_right_key(keys):
    now = datetime.datetime.now(UTC)
    expired = keys.issue(keys.live, not_before=now - datetime.timedelta(days=60), not_after=now - datetime.timedelta(days=1))
    return keys.live, [expired]


def _wrong_host_right_key(keys):
    return keys.live, [keys.issue(keys.live, names=("wrong-host.example",))]


def _pinned_cert_as_extra(keys):
    # The leaf is CA-valid with an unpinned key; the pinned certificate rides along unverified.
    return keys.other, [keys.issue(keys.other), keys.issue(keys.live)]


@pytest.mark.parametrize(
    "build, failure_class",
    [
        (_ca_valid_other_key, "pin-mismatch"),
        (_self_signed_right_name, "untrusted-chain"),
        (_expired_right_key, "expired"),
        (_wrong_host_right_key, "hostname-mismatch"),
        (_pinned_cert_as_extra, "pin-mismatch"),
    ],
    ids=["ca-valid-other-key", "self-signed-right-name", "expired-right-key", "wrong-host-right-key", "pinned-extra"],
)
def test_hostile_broker_refused(build, failure_class, keys, pki, pinned_config, mosquitto_binary, caplog, request):
    key, certificates = build(keys)
    broker = start_broker(keys, request.node.callspec.id, key, certificates, pki.manufacturer_ca)
    try:
        agent = attempt_connect(pinned_config(broker.port))
        log = broker_log_after_attempt(broker)
    finally:
        broker.stop()

    assert agent.uplink.state == "disconnected"
    assert f"failed: {failure_class}:" in failure_lines(caplog)
    assert refused_before_mqtt(log), log


def test_pinned_extra_never_counts(keys, pki, pinned_config, mosquitto_binary, caplog):
    key, certificates = _pinned_cert_as_extra(keys)
    broker = start_broker(keys, "pinned-extra-pins", key, certificates, pki.manufacturer_ca)
    try:
        attempt_connect(pinned_config(broker.port))
    finally:
        broker.stop()

    line = failure_lines(caplog)
    presented = line.split("broker presented", 1)[1]
    assert str(keys.other_pin) in presented
    assert str(keys.live_pin) not in presented


def test_tls11_only_broker_refused(keys, pki, pinned_config, mosquitto_binary, caplog, monkeypatch, tmp_path):
    openssl_conf = tmp_path / "tls11-only.cnf"
    openssl_conf.write_text(TLS11_ONLY_OPENSSL_CONF)
    cert_path, key_path = keys.write_server("tls11", keys.live, [keys.issue(keys.live)])
    broker = DevBroker(tmp_path / "tls11", cert_path, key_path, pki.manufacturer_ca)
    with monkeypatch.context() as patch:
        # Only the Mosquitto process reads this; OpenSSL in this process is already configured.
        patch.setenv("OPENSSL_CONF", str(openssl_conf))
        broker.start()
    try:
        served = _negotiated_version(broker, keys.ca_file, pki)
        agent = attempt_connect(pinned_config(broker.port))
        log = wait_for_connections(broker.log, 3)
    finally:
        broker.stop()

    assert served == "TLSv1.1", "the test broker must speak TLS 1.1 for this test to mean anything"
    assert agent.uplink.state == "disconnected"
    assert "failed: tls-version:" in failure_lines(caplog)
    assert refused_before_mqtt(log, 3), log


def _negotiated_version(broker: DevBroker, ca_file: Path, pki) -> str:
    """Handshake with TLS 1.1 allowed, proving what the broker offers; no MQTT is sent."""
    import socket

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT@SECLEVEL=0")
        context.load_verify_locations(str(ca_file))
        context.load_cert_chain(str(pki.observer_cert), str(pki.observer_key))
        context.check_hostname = False
        with socket.create_connection((broker.host, broker.port), timeout=10) as raw:
            with context.wrap_socket(raw) as tls:
                return tls.version()


def test_reset_during_handshake_refused(pinned_config, caplog):
    server = ResetServer()
    try:
        agent = attempt_connect(pinned_config(server.port))
    finally:
        server.close()

    assert agent.uplink.state == "disconnected"
    assert "failed: reset:" in failure_lines(caplog)
    assert tls_record_types(server.received[0]) == [22]


# --- rotation against a running agent --------------------------------------


class RunningAgent:
    """``edge-agent run`` in a subprocess whose log goes to a file that tests can poll."""

    def __init__(self, agent_command, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            agent_command("run", "--config", str(config), "--duration", "120"),
            stdout=subprocess.DEVNULL, stderr=self._log,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        finally:
            self._log.close()
        return code


def switch_key(broker: DevBroker, keys, name: str, key) -> int:
    """Restart ``broker`` on the same port with a new certificate for ``key``; return the log offset."""
    cert_path, key_path = keys.write_server(name, key, [keys.issue(key)])
    broker.stop()
    offset = len(broker.log())
    broker.cert, broker.key = cert_path, key_path
    broker.start()
    return offset


@pytest.fixture
def live_broker(keys, pki, mosquitto_binary, request):
    broker = start_broker(keys, f"live-{request.node.name}", keys.live, [keys.issue(keys.live)], pki.manufacturer_ca)
    yield broker
    broker.stop()


def test_rotation_to_spare_key_reconnects(live_broker, keys, pinned_config, agent_command, pki, tmp_path):
    agent = RunningAgent(agent_command, pinned_config(live_broker.port), tmp_path / "agent.log")
    try:
        before = wait_for_text(live_broker.log, f"as {pki.device_serial}")
        offset = switch_key(live_broker, keys, "spare", keys.spare)
        after = wait_for_text(lambda: live_broker.log()[offset:], f"as {pki.device_serial}")
    finally:
        code = agent.stop()

    assert f"as {pki.device_serial}" in before
    assert f"as {pki.device_serial}" in after
    assert "pin-mismatch" not in agent.log()
    assert code == 0, agent.log()


def test_rotation_to_unpinned_key_refused(live_broker, keys, pinned_config, agent_command, pki, tmp_path):
    agent = RunningAgent(agent_command, pinned_config(live_broker.port), tmp_path / "agent.log")
    try:
        wait_for_text(live_broker.log, f"as {pki.device_serial}")
        offset = switch_key(live_broker, keys, "unpinned", keys.other)
        agent_log = wait_for_text(agent.log, "failed: pin-mismatch")
        after = wait_for_connections(lambda: live_broker.log()[offset:], 2)
    finally:
        agent.stop()

    refusal = next(line for line in agent_log.splitlines() if "failed: pin-mismatch" in line)
    assert str(keys.live_pin) in refusal
    assert str(keys.spare_pin) in refusal
    assert str(keys.other_pin) in refusal
    assert refused_before_mqtt(after), after


# --- the pin-set expiry policy on a real handshake -----------------------


def test_expired_ca_only_accepts_loudly(keys, pki, pinned_config, mosquitto_binary, caplog):
    broker = start_broker(keys, "ca-only", keys.other, [keys.issue(keys.other)], pki.manufacturer_ca)
    yesterday = (datetime.datetime.now(UTC) - datetime.timedelta(days=1)).date().isoformat()
    try:
        with caplog.at_level(logging.WARNING):
            agent = attempt_connect(pinned_config(broker.port, pins_expire=yesterday, pins_on_expiry="ca-only"))
    finally:
        broker.stop()

    assert agent.uplink.counters.connects == 1
    assert "pin check skipped" in caplog.text
    assert str(keys.other_pin) in caplog.text


def test_expired_enforce_still_refuses(keys, pki, pinned_config, mosquitto_binary, caplog):
    broker = start_broker(keys, "enforce", keys.other, [keys.issue(keys.other)], pki.manufacturer_ca)
    yesterday = (datetime.datetime.now(UTC) - datetime.timedelta(days=1)).date().isoformat()
    try:
        agent = attempt_connect(pinned_config(broker.port, pins_expire=yesterday))
        log = broker_log_after_attempt(broker)
    finally:
        broker.stop()

    assert agent.uplink.state == "disconnected"
    assert "failed: pin-mismatch:" in failure_lines(caplog)
    assert "pins are still enforced" in caplog.text
    assert refused_before_mqtt(log), log
