"""The main job against a real Mosquitto: pinned mutual TLS, telemetry, retained status."""

import json
import subprocess
from pathlib import Path

from edge_agent.devbroker import DevBroker
from edge_agent.devpki import issue_server_cert, make_ca, write_certificates, write_private_key


def run_agent(agent_command, config: Path, seconds: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        agent_command("run", "--config", str(config), "--duration", str(seconds)),
        capture_output=True, text=True, timeout=seconds + 30,
    )


def test_agent_publishes_telemetry_and_status(broker, observer, write_config, agent_command, pki):
    config = write_config(broker.port)

    result = run_agent(agent_command, config, 3.0)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    telemetry = observer.wait_for(3, "/telemetry", timeout_s=5)
    assert len(telemetry) >= 3
    assert telemetry[0].topic == f"edge/{pki.device_serial}/telemetry"

    document = json.loads(telemetry[0].payload)
    assert document["schema"] == 1
    assert document["device_id"] == pki.device_serial
    assert document["ts"].endswith("Z")
    assert "cpu_percent" in document["system"]
    assert "memory" in document["system"]
    assert document["agent"]["connection"] in ("connected", "connecting", "disconnected")
    assert "queue_depth" in document["agent"]
    sequences = [json.loads(m.payload)["seq"] for m in telemetry]
    assert sequences == sorted(sequences)

    statuses = [m.payload for m in observer.received("/status")]
    assert statuses[0] == b"online"
    assert statuses[-1] == b"offline"


def test_broker_sees_certificate_identity(broker, observer, write_config, agent_command, pki):
    config = write_config(broker.port)

    run_agent(agent_command, config, 1.5)

    # use_identity_as_username: the broker took the IDevID's CN as the user name.
    log = broker.log()
    assert f"as {pki.device_serial} (" in log or f"u'{pki.device_serial}'" in log


def test_retained_status_for_late_subscriber(broker, write_config, agent_command, pki):
    from edge_agent.devbroker import Observer

    config = write_config(broker.port)
    run_agent(agent_command, config, 1.5)

    late = Observer(broker, pki.broker_ca, pki.observer_cert, pki.observer_key, client_id="late").start()
    try:
        statuses = late.wait_for(1, "/status", timeout_s=5)
    finally:
        late.stop()
    assert statuses[0].retain
    assert statuses[0].payload == b"offline"


def test_unpinned_broker_key_never_sees_connect(tmp_path, pki, write_config, agent_command, mosquitto_binary):
    # A certificate from the trusted broker CA, for the right name, but with a key no pin names.
    broker_ca = make_ca("edge-agent development broker CA")
    impostor = issue_server_cert(broker_ca)
    folder = tmp_path / "impostor"
    folder.mkdir()
    cert = write_certificates(folder / "broker.pem", [impostor.certificate])
    key = write_private_key(folder / "broker.key", impostor.key)
    ca = write_certificates(folder / "broker-ca.pem", [broker_ca.certificate])

    with DevBroker(folder, cert, key, pki.manufacturer_ca) as impostor_broker:
        config = write_config(impostor_broker.port, broker={"ca_file": str(ca)})
        result = run_agent(agent_command, config, 2.0)
        log = impostor_broker.log()

    assert result.returncode == 0, result.stderr
    assert "pin mismatch" in result.stderr
    assert str(pki.broker_pin) in result.stderr
    assert str(impostor.pin) in result.stderr
    assert "New connection from" in log
    assert "CONNECT" not in log.replace("DISCONNECT", "")
    assert "Received" not in log


def test_spool_keeps_messages_while_broker_is_down(write_config, agent_command, tmp_path):
    from edge_agent.devbroker import free_port
    from edge_agent.spool import Spool

    config = write_config(free_port())

    result = run_agent(agent_command, config, 1.5)

    assert result.returncode == 0, result.stderr
    spool = Spool(tmp_path / "spool.db")
    try:
        assert spool.depth >= 2
    finally:
        spool.close()
