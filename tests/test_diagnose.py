"""edge-agent diagnose against real local set-ups: Mosquitto, TLS servers, fake sysfs and proc trees."""

import datetime
import json
import re
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
from cryptography import x509
from fakehw import FakeProc, FakeSysfs
from pinhelpers import needs_verified_chain

from edge_agent.agentstate import state_file_path
from edge_agent.devbroker import DevBroker, free_port
from edge_agent.devpki import Issued, issue_idevid, issue_server_cert, make_ca, new_key, write_certificates, write_private_key
from edge_agent.diagnose import adapters
from edge_agent.diagnose.model import Report, Status
from edge_agent.diagnose.render import render_json, render_text, supports_colour
from edge_agent.diagnose.runner import CHECK_IDS, run_diagnosis
from edge_agent.entropy import read_entropy_status
from edge_agent.pinning import pin_from_public_key
from edge_agent.spool import Spool

UTC = datetime.timezone.utc
NETWORK = ("broker.resolve", "broker.tcp", "broker.tls", "broker.pin", "pins.backup", "broker.cert-expiry", "mqtt.connect")
IDENTITY = tuple(i for i in CHECK_IDS if i.startswith("identity."))


# --- set-ups ------------------------------------------------------------------


@pytest.fixture
def fake_sysfs(tmp_path: Path) -> Callable[[int], dict]:
    """Return thermal settings that read ``millidegrees`` from a test-built sysfs tree."""

    def settings(millidegrees: int) -> dict:
        FakeSysfs(tmp_path / "sys").zone(0, "cpu-thermal", str(millidegrees))
        return {"sysfs_root": str(tmp_path / "sys"), "sensors": ["no-such-sensor"]}

    return settings


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory) -> Issued:
    return make_ca("diagnose test broker CA")


@pytest.fixture(scope="session")
def test_ca_file(tmp_path_factory, test_ca: Issued) -> Path:
    return write_certificates(tmp_path_factory.mktemp("test-ca") / "ca.pem", [test_ca.certificate])


@pytest.fixture
def start_broker(tmp_path: Path, pki, mosquitto_binary) -> Iterator[Callable[..., DevBroker]]:
    """Start a Mosquitto with ``issued`` as its certificate; every broker stops after the test."""
    started: List[DevBroker] = []

    def start(name: str, issued: Issued, client_ca: Path = pki.manufacturer_ca, **options) -> DevBroker:
        folder = tmp_path / name
        folder.mkdir()
        cert = write_certificates(folder / "broker.pem", [issued.certificate])
        key = write_private_key(folder / "broker.key", issued.key)
        broker = DevBroker(folder, cert, key, client_ca, **options).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def tcp_server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Run ``handle(connection)`` for one connection on a loopback port; return the port."""
    servers: List[socket.socket] = []

    def serve(handle: Callable[[socket.socket], None]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        servers.append(listener)

        def accept_one() -> None:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                handle(connection)

        threading.Thread(target=accept_one, daemon=True).start()
        return listener.getsockname()[1]

    yield serve
    for listener in servers:
        listener.close()


def diagnose(config: Path, only=None, **options) -> Report:
    return run_diagnosis(config, timeout_s=options.pop("timeout_s", 5.0), only=only, **options)


def status_of(report: Report, check_id: str) -> Status:
    return report.result(check_id).status


def server_pins(issued: Issued, pki) -> list:
    return [str(issued.pin), str(pki.spare_pin)]


def wait_for_state(config_dir: Path, predicate, timeout_s: float = 30.0) -> dict:
    path = state_file_path(config_dir / "spool.db")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = None
        if state and predicate(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"agent state file {path} never matched")


def wait_for_log(broker: DevBroker, text: str, timeout_s: float = 10.0) -> str:
    """Return the broker log once it contains ``text`` (Mosquitto logs a moment after the client acts)."""
    deadline = time.monotonic() + timeout_s
    log = broker.log()
    while text not in log and time.monotonic() < deadline:
        time.sleep(0.05)
        log = broker.log()
    return log


@pytest.fixture
def running_agent(broker, write_config, agent_command, fake_sysfs, tmp_path) -> Iterator[Path]:
    """A healthy gateway: the agent runs, connected to a real Mosquitto, and has published."""
    config = write_config(broker.port, thermal=fake_sysfs(45000))
    process = subprocess.Popen(
        agent_command("run", "--config", str(config), "--duration", "120"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_state(tmp_path, lambda s: s["state"] == "connected" and s["last_publish_ack"])
        yield config
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- configuration, clock, identity -------------------------------------------------


def test_config_missing_skips_dependents(tmp_path):
    report = diagnose(tmp_path / "absent.toml")

    assert status_of(report, "config") is Status.ERROR
    assert "not found" in report.result("config").finding
    assert status_of(report, "identity.certificate") is Status.SKIPPED
    assert status_of(report, "mqtt.connect") is Status.SKIPPED
    assert status_of(report, "clock") is Status.OK


def test_config_unknown_key_named(write_config):
    report = diagnose(write_config(broker={"pinz": ["x"]}), only=("config",))

    assert status_of(report, "config") is Status.ERROR
    assert "broker.pinz: unknown key" in report.result("config").finding
    assert "Did you mean 'pins'?" in report.result("config").remedy


def test_clock_before_build_date(write_config):
    epoch = datetime.datetime(1970, 1, 1, 0, 5, tzinfo=UTC)

    report = diagnose(write_config(), only=("clock",), now=lambda: epoch)

    assert status_of(report, "clock") is Status.ERROR
    assert "1970-01-01 00:05:00 UTC" in report.result("clock").finding
    assert "timedatectl" in report.result("clock").remedy


def test_identity_steps_pass(write_config):
    report = diagnose(write_config(), only=IDENTITY)

    not_ok = [r.id for r in report.results if r.status is not Status.OK]
    assert not_ok == ["identity.ldevid", "identity.tpm"]
    assert status_of(report, "identity.ldevid") is Status.SKIPPED
    assert "GW-0001" in report.result("identity.device-id").finding
    assert "no expiration" in report.result("identity.time").finding
    assert "IDevID" in report.result("identity.selection").finding


def test_key_mode_fails_with_chmod(write_config, pki, tmp_path):
    key = tmp_path / "open.key"
    key.write_bytes(pki.idevid_key.read_bytes())
    key.chmod(0o644)

    report = diagnose(write_config(identity={"key": str(key)}), only=("config",) + IDENTITY)

    assert status_of(report, "config") is Status.ERROR
    assert status_of(report, "identity.certificate") is Status.OK
    assert status_of(report, "identity.key-mode") is Status.ERROR
    assert f"chmod 600 {key}" in report.result("identity.key-mode").remedy
    assert status_of(report, "identity.key-match") is Status.SKIPPED
    assert status_of(report, "identity.selection") is Status.ERROR


def test_foreign_key_fails_key_match(write_config, tmp_path):
    key = write_private_key(tmp_path / "other.key", new_key())

    report = diagnose(write_config(identity={"key": str(key)}), only=IDENTITY)

    assert status_of(report, "identity.key-mode") is Status.OK
    assert status_of(report, "identity.key-match") is Status.ERROR
    assert "does not belong" in report.result("identity.key-match").finding
    assert "Install the key that was issued with it" in report.result("identity.key-match").remedy
    assert status_of(report, "identity.chain") is Status.OK


def test_unknown_issuer_fails_chain(write_config, pki):
    report = diagnose(write_config(identity={"trust_anchors": [str(pki.broker_ca)]}), only=IDENTITY)

    assert status_of(report, "identity.chain") is Status.ERROR
    assert "identity.trust_anchors" in report.result("identity.chain").finding


def test_wrong_passphrase_never_printed(write_config, pki, tmp_path):
    manufacturer = make_ca("passphrase test manufacturer")
    device = issue_idevid(manufacturer, "GW-SECRET")
    cert = write_certificates(tmp_path / "dev.pem", [device.certificate])
    anchor = write_certificates(tmp_path / "mca.pem", [manufacturer.certificate])
    key = write_private_key(tmp_path / "dev.key", device.key, passphrase=b"correct-horse-battery")
    wrong = tmp_path / "pass.txt"
    wrong.write_text("wrong-passphrase-value\n")
    wrong.chmod(0o600)
    config = write_config(identity={"cert": str(cert), "key": str(key), "trust_anchors": [str(anchor)],
                                    "key_passphrase_file": str(wrong)})

    report = diagnose(config, only=IDENTITY)
    output = render_text(report) + render_json(report)

    assert status_of(report, "identity.key-match") is Status.ERROR
    assert "passphrase is wrong" in report.result("identity.key-match").finding
    assert "wrong-passphrase-value" not in output
    assert "correct-horse-battery" not in output
    assert "PRIVATE KEY" not in output


@pytest.mark.parametrize(
    "not_after_days, status, text",
    [(400, Status.OK, "expires in 399 days"), (10, Status.WARNING, "expires in 9 days"), (-1, Status.WARNING, "expired on")],
)
def test_device_cert_validity(write_config, pki, tmp_path, not_after_days, status, text):
    manufacturer = make_ca("validity test manufacturer")
    now = datetime.datetime.now(UTC)
    device = issue_idevid(
        manufacturer, "GW-TIME", not_before=now - datetime.timedelta(days=30),
        not_after=now + datetime.timedelta(days=not_after_days),
    )
    cert = write_certificates(tmp_path / "dev.pem", [device.certificate])
    key = write_private_key(tmp_path / "dev.key", device.key)
    anchor = write_certificates(tmp_path / "mca.pem", [manufacturer.certificate])
    config = write_config(identity={"cert": str(cert), "key": str(key), "trust_anchors": [str(anchor)]})

    report = diagnose(config, only=IDENTITY)

    assert status_of(report, "identity.time") is status
    assert text in report.result("identity.time").finding


# --- entropy, thermal, OpenSSL ------------------------------------------------------


def test_entropy_ready_on_this_machine(write_config):
    report = diagnose(write_config(), only=("entropy",))

    assert status_of(report, "entropy") is Status.OK


def test_entropy_low_pool_fails(write_config, tmp_path):
    FakeProc(tmp_path / "proc").set(entropy_avail=40, poolsize=4096)

    report = diagnose(write_config(entropy={"proc_root": str(tmp_path / "proc")}), only=("entropy",))

    assert status_of(report, "entropy") is Status.ERROR
    assert "entropy_avail 40 bits" in report.result("entropy").finding


def test_crng_not_ready_skips_tls(broker, write_config, monkeypatch):
    # The CRNG of a running machine cannot be made unready, so only its reading is replaced.
    monkeypatch.setattr(adapters, "entropy_status", lambda settings: read_entropy_status(settings, probe=lambda: False))

    report = diagnose(write_config(broker.port), only=("entropy",) + NETWORK)

    assert status_of(report, "entropy") is Status.ERROR
    assert status_of(report, "broker.tcp") is Status.OK
    assert status_of(report, "broker.tls") is Status.SKIPPED
    assert "would block" in report.result("broker.tls").finding


@pytest.mark.parametrize(
    "millidegrees, status, state",
    [(45000, Status.OK, "normal"), (82000, Status.WARNING, "hot"), (95000, Status.ERROR, "critical")],
)
def test_thermal_states_from_sysfs(write_config, fake_sysfs, millidegrees, status, state):
    report = diagnose(write_config(thermal=fake_sysfs(millidegrees)), only=("thermal",))

    assert status_of(report, "thermal") is status
    assert f"governor state {state}" in report.result("thermal").finding


def test_thermal_without_sensor_warns(write_config, tmp_path):
    settings = {"sysfs_root": str(tmp_path / "empty-sys"), "sensors": ["no-such-sensor"]}

    report = diagnose(write_config(thermal=settings), only=("thermal",))

    assert status_of(report, "thermal") is Status.WARNING
    assert "no temperature reading" in report.result("thermal").finding


def test_openssl_current_passes(write_config):
    report = diagnose(write_config(), only=("openssl",))

    assert status_of(report, "openssl") is Status.OK
    assert "TLS 1.2 and TLS 1.3" in report.result("openssl").finding


def test_openssl_before_3_warns(write_config, monkeypatch):
    # An OpenSSL 1.1.1 cannot be installed beside the system one, so only its version report is replaced.
    monkeypatch.setattr(ssl, "OPENSSL_VERSION_INFO", (1, 1, 1, 23, 15))
    monkeypatch.setattr(ssl, "OPENSSL_VERSION", "OpenSSL 1.1.1w  11 Sep 2023")

    report = diagnose(write_config(), only=("openssl",))

    assert status_of(report, "openssl") is Status.WARNING
    assert "no longer receives security fixes" in report.result("openssl").finding


# --- pin-set -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "days, status, text",
    [(None, Status.OK, "no expiry date"), (400, Status.OK, "valid until"), (10, Status.WARNING, "expires in 10 days"),
     (-3, Status.WARNING, "expired on")],
)
def test_pins_expiry_horizon(write_config, days, status, text):
    broker = {}
    if days is not None:
        broker["pins_expire"] = (datetime.date.today() + datetime.timedelta(days=days)).isoformat()

    report = diagnose(write_config(broker=broker), only=("pins.expiry",))

    assert status_of(report, "pins.expiry") is status
    assert text in report.result("pins.expiry").finding


# --- the way to the broker --------------------------------------------------------------


def test_healthy_broker_connect_accepted(broker, write_config, pki):
    report = diagnose(write_config(broker.port), only=NETWORK)

    assert [r.status for r in report.results] == [Status.OK] * len(NETWORK)
    assert "device certificate accepted" in report.result("broker.tls").finding
    assert "pin 1 of 2" in report.result("broker.pin").finding
    assert "pin 2" in report.result("pins.backup").finding
    assert "accepted; disconnected cleanly" in report.result("mqtt.connect").finding
    log = wait_for_log(broker, f"Received DISCONNECT from {pki.device_serial}")
    assert f"Received DISCONNECT from {pki.device_serial}" in log
    assert f"Received PUBLISH from {pki.device_serial}" not in log


def test_closed_port_refused(write_config):
    report = diagnose(write_config(free_port()), only=NETWORK)

    assert status_of(report, "broker.tcp") is Status.ERROR
    assert report.result("broker.tcp").failure_class == "connection-refused"
    assert status_of(report, "broker.tls") is Status.SKIPPED
    assert status_of(report, "mqtt.connect") is Status.SKIPPED


def test_invalid_host_does_not_resolve(write_config):
    started = time.monotonic()

    report = diagnose(write_config(broker={"host": "broker.gateway.invalid"}), only=NETWORK)

    assert status_of(report, "broker.resolve") is Status.ERROR
    assert report.result("broker.resolve").failure_class == "dns-failure"
    assert status_of(report, "broker.tcp") is Status.SKIPPED
    assert time.monotonic() - started < 5


def test_localhost_name_resolves(broker, write_config):
    report = diagnose(write_config(broker.port, broker={"host": "localhost"}), only=("broker.resolve",))

    assert status_of(report, "broker.resolve") is Status.OK
    assert "127.0.0.1" in report.result("broker.resolve").finding


def test_wrong_pin_shows_both_sides(broker, write_config, pki):
    wrong = pin_from_public_key(new_key().public_key())

    report = diagnose(write_config(broker.port, broker={"pins": [str(wrong), str(pki.spare_pin)]}), only=NETWORK)

    pin_result = report.result("broker.pin")
    assert pin_result.status is Status.ERROR
    assert pin_result.failure_class == "pin-mismatch"
    expected = [d.value for d in pin_result.details if d.note.startswith("#")]
    observed = [d.value for d in pin_result.details if not d.note.startswith("#")]
    assert expected == [str(wrong), str(pki.spare_pin)]
    assert str(pki.broker_pin) in observed
    assert status_of(report, "broker.tls") is Status.OK
    assert status_of(report, "mqtt.connect") is Status.SKIPPED
    assert f"as {pki.device_serial}" not in broker.log()


def test_untrusted_chain_classified(broker, write_config, test_ca_file):
    report = diagnose(write_config(broker.port, broker={"ca_file": str(test_ca_file)}), only=NETWORK)

    tls = report.result("broker.tls")
    assert tls.status is Status.ERROR
    assert tls.failure_class == "untrusted-chain"
    assert any(d.label == "issuer" and "development broker CA" in d.value for d in tls.details)
    assert status_of(report, "broker.pin") is Status.SKIPPED


def test_host_name_mismatch_classified(broker, write_config):
    report = diagnose(write_config(broker.port, broker={"server_name": "wrong.example"}), only=NETWORK)

    assert report.result("broker.tls").failure_class == "hostname-mismatch"
    assert "wrong.example" in report.result("broker.tls").finding


def test_expired_broker_cert_notes_clock(start_broker, write_config, test_ca, test_ca_file, pki):
    now = datetime.datetime.now(UTC)
    expired = issue_server_cert(test_ca, not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    broker = start_broker("expired", expired)
    config = write_config(broker.port, broker={"ca_file": str(test_ca_file), "pins": server_pins(expired, pki)})

    report = diagnose(config, only=NETWORK)
    at_epoch = diagnose(config, only=NETWORK, now=lambda: datetime.datetime(1970, 1, 1, tzinfo=UTC))

    assert report.result("broker.tls").failure_class == "cert-expired"
    assert "Note:" not in report.result("broker.tls").remedy
    assert "renew" in report.result("broker.tls").remedy
    assert "Note: the local clock reads 1970-01-01" in at_epoch.result("broker.tls").remedy
    assert status_of(report, "broker.cert-expiry") is Status.ERROR


def test_not_yet_valid_broker_cert(start_broker, write_config, test_ca, test_ca_file, pki):
    now = datetime.datetime.now(UTC)
    future = issue_server_cert(test_ca, not_before=now + datetime.timedelta(days=2), not_after=now + datetime.timedelta(days=90))
    broker = start_broker("future", future)
    config = write_config(broker.port, broker={"ca_file": str(test_ca_file), "pins": server_pins(future, pki)})

    report = diagnose(config, only=NETWORK)

    assert report.result("broker.tls").failure_class == "cert-not-yet-valid"
    assert "timedatectl" in report.result("broker.tls").remedy


def test_broker_cert_expiring_soon_warns(start_broker, write_config, test_ca, test_ca_file, pki):
    now = datetime.datetime.now(UTC)
    soon = issue_server_cert(test_ca, not_before=now - datetime.timedelta(days=300), not_after=now + datetime.timedelta(days=10))
    broker = start_broker("soon", soon)
    config = write_config(broker.port, broker={"ca_file": str(test_ca_file), "pins": server_pins(soon, pki)})

    report = diagnose(config, only=NETWORK)

    assert status_of(report, "broker.tls") is Status.OK
    assert status_of(report, "broker.cert-expiry") is Status.WARNING
    assert "expires in 9 days" in report.result("broker.cert-expiry").finding


@needs_verified_chain
def test_leaf_and_ca_pins_leave_no_backup(broker, write_config, pki):
    ca_pin = pin_from_public_key(x509.load_pem_x509_certificate(pki.broker_ca.read_bytes()).public_key())

    report = diagnose(write_config(broker.port, broker={"pins": [str(pki.broker_pin), str(ca_pin)]}), only=NETWORK)

    assert status_of(report, "broker.pin") is Status.OK
    assert status_of(report, "pins.backup") is Status.WARNING
    assert "spare key" in report.result("pins.backup").remedy


def test_tls_version_mismatch(tcp_server, write_config, pki):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(pki.broker_cert), str(pki.broker_key))
    server.maximum_version = ssl.TLSVersion.TLSv1_2

    def handshake(connection: socket.socket) -> None:
        try:
            server.wrap_socket(connection, server_side=True)
        except (ssl.SSLError, OSError):
            pass

    port = tcp_server(handshake)
    report = diagnose(write_config(port, broker={"tls_min_version": "1.3"}), only=NETWORK)

    assert report.result("broker.tls").failure_class == "tls-version-mismatch"
    assert "TLS 1.2" in report.result("broker.tls").remedy


def test_reset_during_handshake(tcp_server, write_config):
    def reset(connection: socket.socket) -> None:
        connection.recv(16)
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    report = diagnose(write_config(tcp_server(reset)), only=NETWORK)

    assert status_of(report, "broker.tcp") is Status.OK
    assert report.result("broker.tls").failure_class == "reset-during-handshake"


def test_silent_server_times_out(write_config):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nothing ever responds
        started = time.monotonic()

        report = diagnose(write_config(silent.getsockname()[1]), only=NETWORK, timeout_s=1.0)

        elapsed = time.monotonic() - started
    assert report.result("broker.tls").failure_class == "timed-out"
    assert elapsed < 10


def test_client_cert_rejected_by_broker(start_broker, write_config, pki, test_ca, test_ca_file):
    server = issue_server_cert(test_ca)
    # The broker trusts only the test CA for client certificates, not the manufacturer CA.
    broker = start_broker("rejecting", server, client_ca=test_ca_file)
    config = write_config(broker.port, broker={"ca_file": str(test_ca_file), "pins": server_pins(server, pki)})

    report = diagnose(config, only=NETWORK)

    assert report.result("broker.tls").failure_class == "client-cert-rejected"
    assert "UNKNOWN_CA" in report.result("broker.tls").finding
    assert "manufacturer CA" in report.result("broker.tls").remedy
    assert status_of(report, "mqtt.connect") is Status.SKIPPED


def test_identity_rejected_at_connect(start_broker, write_config, pki, test_ca, test_ca_file):
    server = issue_server_cert(test_ca)
    broker = start_broker("prefixes", server, extra_config="clientid_prefixes cloud-\n")
    config = write_config(broker.port, broker={"ca_file": str(test_ca_file), "pins": server_pins(server, pki)})

    report = diagnose(config, only=NETWORK)

    assert status_of(report, "broker.tls") is Status.OK
    assert report.result("mqtt.connect").failure_class == "identity-rejected"
    assert "Not authorized" in report.result("mqtt.connect").finding


def test_offline_skips_network(write_config):
    report = diagnose(write_config(free_port()), offline=True)

    skipped = {r.id for r in report.results if r.status is Status.SKIPPED}
    assert set(NETWORK) - {"pins.backup"} <= skipped
    assert status_of(report, "pins.backup") is Status.OK


# --- spool and service -----------------------------------------------------------------


def test_missing_spool_warns(write_config):
    report = diagnose(write_config(), only=("spool",))

    assert status_of(report, "spool") is Status.WARNING
    assert "no spool" in report.result("spool").finding


def test_spool_backlog_reports_age(write_config, tmp_path):
    spool = Spool(tmp_path / "spool.db", clock=lambda: time.time() - 7200)
    for _ in range(3):
        spool.append("edge/GW-0001/telemetry", b"{}")

    report = diagnose(write_config(), only=("spool",))
    spool.close()

    assert status_of(report, "spool") is Status.WARNING
    assert "3 messages" in report.result("spool").finding
    assert "oldest for 2 h" in report.result("spool").finding
    assert "not draining" in report.result("spool").remedy


def test_empty_spool_passes(write_config, tmp_path):
    Spool(tmp_path / "spool.db").close()

    report = diagnose(write_config(), only=("spool",))

    assert status_of(report, "spool") is Status.OK
    assert report.result("spool").finding.startswith("empty")


def test_corrupt_spool_left_in_place(write_config, tmp_path):
    corrupt = tmp_path / "spool.db"
    corrupt.write_bytes(b"not a database" * 100)

    report = diagnose(write_config(), only=("spool",))

    assert status_of(report, "spool") is Status.ERROR
    assert corrupt.read_bytes() == b"not a database" * 100
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("spool.db")) == ["spool.db"]


def test_service_never_ran(write_config):
    report = diagnose(write_config(), only=("service",))

    assert status_of(report, "service") is Status.ERROR
    assert "has not run" in report.result("service").finding


def test_service_crashed_agent_detected(write_config, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = {
        "pid": dead.pid, "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(), "state": "connected",
        "started": time.time() - 60, "updated": time.time() - 5, "updated_monotonic": time.monotonic() - 5,
        "last_publish_ack": time.time() - 10, "last_publish_ack_monotonic": time.monotonic() - 10,
        "last_error": None,
    }
    state_file_path(tmp_path / "spool.db").write_text(json.dumps(state))

    report = diagnose(write_config(), only=("service",))

    assert status_of(report, "service") is Status.ERROR
    assert "without a clean stop" in report.result("service").finding


def test_healthy_gateway_all_ok(running_agent):
    report = diagnose(running_agent)

    not_ok = [(r.id, r.status.value, r.finding) for r in report.results if r.status is not Status.OK]
    assert not_ok == [
        ("identity.ldevid", "skipped", "no LDevID configured ([identity.ldevid])"),
        ("identity.tpm", "skipped", 'the device key is a file (identity.key_source = "file")'),
    ]
    assert report.result("service").finding.startswith("running (pid")
    assert "not repeated" in report.result("mqtt.connect").finding
    assert report.exit_code == 0


def test_stopped_agent_reported(broker, write_config, agent_command, tmp_path):
    config = write_config(broker.port)
    subprocess.run(agent_command("run", "--config", str(config), "--duration", "1.5"), capture_output=True, timeout=60)

    report = diagnose(config, only=("service",))

    assert status_of(report, "service") is Status.ERROR
    assert "stopped cleanly" in report.result("service").finding
    assert "last publish acknowledged" in report.result("service").finding


# --- output forms and the command line -------------------------------------------------


def assert_serial_friendly(text: str) -> None:
    for number, line in enumerate(text.splitlines(), start=1):
        assert len(line) <= 80, f"line {number} has {len(line)} columns: {line!r}"
        assert line.isascii(), f"line {number} is not ASCII: {line!r}"
        assert all(ch.isprintable() for ch in line), f"line {number} has control characters: {line!r}"


def test_healthy_gateway_text_and_json(running_agent, agent_command):
    text = subprocess.run(agent_command("diagnose", "--config", str(running_agent)), capture_output=True, text=True, timeout=60)
    as_json = subprocess.run(
        agent_command("diagnose", "--json", "--config", str(running_agent)), capture_output=True, text=True, timeout=60
    )

    assert text.returncode == 0, text.stdout + text.stderr
    assert_serial_friendly(text.stdout)
    assert "\x1b[" not in text.stdout
    assert "healthy (exit 0)" in text.stdout
    document = json.loads(as_json.stdout)
    assert as_json.returncode == 0
    assert as_json.stdout.isascii()
    assert document["exit_code"] == 0
    assert [c["id"] for c in document["checks"]] == list(CHECK_IDS)
    assert {c["status"] for c in document["checks"] if c["id"] not in ("identity.ldevid", "identity.tpm")} == {"ok"}


def test_broken_gateway_text_and_json(broker, write_config, agent_command, pki, tmp_path):
    key = tmp_path / "open.key"
    key.write_bytes(pki.idevid_key.read_bytes())
    key.chmod(0o644)
    wrong = pin_from_public_key(new_key().public_key())
    config = write_config(broker.port, identity={"key": str(key)}, broker={"pins": [str(wrong), str(pki.spare_pin)]})

    text = subprocess.run(agent_command("diagnose", "--config", str(config)), capture_output=True, text=True, timeout=60)
    as_json = subprocess.run(agent_command("diagnose", "--json", "--config", str(config)), capture_output=True, text=True, timeout=60)

    assert text.returncode == 1
    assert_serial_friendly(text.stdout)
    assert "Traceback" not in text.stderr
    pin_lines = [line for line in text.stdout.splitlines() if "sha256//" in line]
    assert any(line.lstrip().startswith("expected  " + str(wrong)) for line in pin_lines)
    assert any(line.lstrip().startswith("observed  " + str(pki.broker_pin)) for line in pin_lines)
    assert "PRIVATE KEY" not in text.stdout
    document = json.loads(as_json.stdout)
    assert as_json.returncode == 1
    checks = {c["id"]: c for c in document["checks"]}
    assert checks["broker.pin"]["class"] == "pin-mismatch"
    assert checks["identity.key-mode"]["status"] == "error"
    assert checks["mqtt.connect"]["status"] == "skipped"
    assert document["summary"]["error"] >= 3


def test_usage_error_exits_2(agent_command):
    result = subprocess.run(agent_command("diagnose", "--timeout", "soon"), capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "invalid number of seconds 'soon'" in result.stderr
    assert "Traceback" not in result.stderr


def test_colour_only_on_terminal(monkeypatch, write_config):
    report = diagnose(write_config(), only=("clock",))
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal:
            monkeypatch.setenv("TERM", "xterm")
            monkeypatch.delenv("NO_COLOR", raising=False)
            on_terminal = supports_colour(terminal)
            monkeypatch.setenv("NO_COLOR", "1")
            with_no_color = supports_colour(terminal)
    finally:
        os.close(master)
        os.close(slave)

    assert on_terminal is True
    assert with_no_color is False
    assert "\x1b[32m[ OK ]\x1b[0m" in render_text(report, colour=True)


def test_hostile_subject_escaped(write_config, tmp_path):
    manufacturer = make_ca("escape test manufacturer")
    device = issue_idevid(manufacturer, "GW-0002", common_name="GW-\x1b[2J-\u00e9")
    cert = write_certificates(tmp_path / "dev.pem", [device.certificate])
    key = write_private_key(tmp_path / "dev.key", device.key)
    anchor = write_certificates(tmp_path / "mca.pem", [manufacturer.certificate])
    config = write_config(identity={"cert": str(cert), "key": str(key), "trust_anchors": [str(anchor)]})

    text = render_text(diagnose(config, only=IDENTITY))

    assert_serial_friendly(text)
    assert "\\x1b[2J" in text


def test_unloadable_ca_file_is_finding(write_config, agent_command, tmp_path):
    from edge_agent.devbroker import free_port

    garbage = tmp_path / "garbage-ca.pem"
    garbage.write_text("not a certificate\n")
    config = write_config(free_port(), broker={"ca_file": str(garbage)})

    result = subprocess.run(
        agent_command("diagnose", "--config", str(config), "--timeout", "2"), capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 1
    assert "cannot load the CA file" in result.stdout
    assert "bug in edge-agent" not in result.stdout
    assert "Traceback" not in result.stderr


def test_quoted_commands_stay_on_one_line():
    from edge_agent.diagnose.model import Detail
    from edge_agent.diagnose.render import _detail_lines

    text = "Start it with 'systemctl start edge-agent' and read 'journalctl -u edge-agent -n 50' for the cause."

    lines = _detail_lines(Detail("fix", text))

    assert any("'journalctl -u edge-agent -n 50'" in line for line in lines)
    assert any("'systemctl start edge-agent'" in line for line in lines)
    assert all(len(line) <= 80 for line in lines)


def test_generated_at_is_iso_8601(write_config):
    report = run_diagnosis(write_config(), offline=True)

    document = json.loads(render_json(report))

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", document["generated_at"])
