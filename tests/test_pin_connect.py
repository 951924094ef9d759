"""``edge-agent pin --connect`` and ``config check --connect`` against real TLS servers, and curl's view of our pins."""

import datetime
import json
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest
from cryptography import x509

from edge_agent.chainprobe import parse_host_port
from edge_agent.cli import main
from edge_agent.errors import EdgeAgentError
from edge_agent.pinning import pin_from_certificate
from pinhelpers import (
    ResetServer,
    connection_lines,
    create_broker_keys,
    needs_verified_chain,
    refused_before_mqtt,
    start_broker,
    wait_for_connections,
)

pytestmark = pytest.mark.broker

CURL_PIN_MISMATCH = 90


def run(capsys, *args: str):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def broker_ca_pin(pki):
    return pin_from_certificate(x509.load_pem_x509_certificate(pki.broker_ca.read_bytes()))


# --- pin --connect --------------------------------------------------------------


@needs_verified_chain
def test_connect_lists_verified_chain(broker, write_config, pki, capsys):
    config = write_config(broker.port)

    code, out, _ = run(capsys, "pin", "--connect", f"127.0.0.1:{broker.port}", "--config", str(config))

    assert code == 0
    assert "chain verified against" in out
    assert "position 0 (sent by the server, in the verified chain)" in out
    assert "  subject  CN=localhost,O=edge-agent development" in out
    assert "  issuer   CN=edge-agent development broker CA" in out
    assert "  expires  " in out
    assert f"  pin      {pki.broker_pin}" in out
    assert "  matches  broker.pins[0]" in out
    assert "trust anchor from the CA file" in out
    assert "result: ACCEPTED" in out
    assert "warning:" not in out


def test_connect_sends_no_mqtt(broker, write_config, capsys):
    config = write_config(broker.port)

    run(capsys, "pin", "--connect", f"127.0.0.1:{broker.port}", "--config", str(config))
    log = wait_for_connections(broker.log, 2)

    assert refused_before_mqtt(log), log


def test_connect_reports_unverified_chain(broker, pki, capsys):
    code, out, _ = run(
        capsys, "pin", "--connect", f"127.0.0.1:{broker.port}", "--servername", "localhost",
        "--ca-file", str(pki.manufacturer_ca),
    )

    assert code == 1
    assert "chain NOT verified" in out
    assert "untrusted-chain" in out
    assert "position 0 (sent by the server, unverified)" in out
    assert f"  pin      {pki.broker_pin}" in out
    assert "result: REJECTED" in out


@needs_verified_chain
def test_connect_accepts_trust_anchor_pin(broker, write_config, pki, capsys):
    config = write_config(broker.port, broker={"pins": [str(pki.spare_pin), str(broker_ca_pin(pki))]})

    code, out, _ = run(capsys, "pin", "--connect", "--config", str(config))

    assert code == 0
    assert "  matches  no configured pin" in out
    assert "  matches  broker.pins[1]" in out
    assert "result: ACCEPTED: broker.pins[1]" in out


def test_connect_rejects_unpinned_chain(broker, write_config, pki, capsys):
    other = f"sha256//{'A' * 43}="
    config = write_config(broker.port, broker={"pins": [str(pki.spare_pin), other]})

    code, out, _ = run(capsys, "pin", "--connect", "--config", str(config))

    assert code == 1
    assert "result: REJECTED: pin-mismatch" in out


@needs_verified_chain
def test_connect_warns_without_backup(broker, write_config, pki, capsys):
    config = write_config(broker.port, broker={"pins": [str(pki.broker_pin), str(broker_ca_pin(pki))]})

    code, out, _ = run(capsys, "pin", "--connect", "--config", str(config))

    assert code == 0
    assert "warning: no configured pin is a backup" in out


@needs_verified_chain
def test_connect_json_document(broker, write_config, pki, capsys):
    config = write_config(broker.port)

    code, out, _ = run(capsys, "pin", "--connect", "--config", str(config), "--json")
    document = json.loads(out)

    assert code == 0
    assert document["accepted"] is True
    assert document["verified"] is True
    assert document["matched_pin"] == str(pki.broker_pin)
    assert document["certificates"][0]["position"] == 0
    assert document["certificates"][0]["configured_pin_index"] == 0
    assert document["certificates"][1]["presented"] is False
    assert document["warnings"] == []


def test_connect_android_pin_set(broker, pki, capsys):
    code, out, _ = run(
        capsys, "pin", "--connect", f"127.0.0.1:{broker.port}", "--ca-file", str(pki.broker_ca),
        "--format", "android", "--expires", "2027-01-31",
    )
    element = ElementTree.fromstring(out)

    assert code == 0
    assert element.get("expiration") == "2027-01-31"
    assert element[0].text == pki.broker_pin.digest_base64


def test_connect_without_config(broker, pki, capsys):
    code, out, _ = run(capsys, "pin", "--connect", f"127.0.0.1:{broker.port}", "--ca-file", str(pki.broker_ca))

    assert code == 0
    assert "no pin-set given" in out
    assert "  matches  not checked" in out


def test_connect_needs_ca_file(capsys):
    code, _, err = run(capsys, "pin", "--connect", "127.0.0.1:1")

    assert code == 1
    assert "pass --ca-file FILE or --config FILE" in err


def test_connect_missing_ca_file(tmp_path, capsys):
    missing = tmp_path / "absent-ca.pem"

    code, _, err = run(capsys, "pin", "--connect", "127.0.0.1:1", "--ca-file", str(missing))

    assert code == 1
    assert f"{missing}: cannot load the CA file" in err


@needs_verified_chain
def test_connect_marks_pinned_extra(tmp_path, pki, write_config, mosquitto_binary, capsys):
    keys = create_broker_keys(tmp_path / "keys")
    extra = start_broker(
        keys, "extra", keys.other, [keys.issue(keys.other), keys.issue(keys.live)], pki.manufacturer_ca,
    )
    try:
        config = write_config(extra.port, broker={"ca_file": str(keys.ca_file), "pins": keys.pins})
        code, out, _ = run(capsys, "pin", "--connect", "--config", str(config))
    finally:
        extra.stop()

    assert code == 1
    assert "position 1 (sent by the server, NOT in the verified chain)" in out
    assert "  matches  broker.pins[0], but outside the verified chain: it does not count" in out
    assert "result: REJECTED: pin-mismatch" in out


def test_connect_classifies_reset(write_config, capsys):
    server = ResetServer()
    try:
        code, out, _ = run(capsys, "pin", "--connect", f"127.0.0.1:{server.port}", "--config", str(write_config()))
    finally:
        server.close()

    assert code == 1
    assert "TLS handshake failed: reset:" in out
    assert "result: REJECTED: the TLS handshake failed" in out


def test_entropy_gate_blocks_handshake(broker, write_config, tmp_path, capsys):
    random_dir = tmp_path / "proc" / "sys" / "kernel" / "random"
    random_dir.mkdir(parents=True)
    (random_dir / "entropy_avail").write_text("10\n")
    (random_dir / "poolsize").write_text("4096\n")
    config = write_config(broker.port, entropy={"proc_root": str(tmp_path / "proc"), "wait_max_s": 0.0})

    code, _, err = run(capsys, "pin", "--connect", "--config", str(config))

    assert code == 1
    assert "kernel random generator is not ready" in err
    assert "entropy_avail 10 bits" in err
    assert len(connection_lines(broker.log())) <= 1


def test_connect_subprocess(broker, write_config, agent_command):
    config = write_config(broker.port)

    result = subprocess.run(agent_command("pin", "--connect", "--config", str(config)),
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "result: ACCEPTED" in result.stdout


@pytest.mark.parametrize(
    "text, expected",
    [
        ("broker.example.net:8883", ("broker.example.net", 8883)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:8883", ("::1", 8883)),
    ],
)
def test_parse_host_port(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("broker", "the port is missing"),
        ("broker:http", "invalid port"),
        ("broker:70000", "invalid port"),
        ("::1:8883", "in brackets"),
        ("[::1:8883", "missing ']'"),
        (":8883", "the host is empty"),
    ],
)
def test_parse_host_port_errors(text, message):
    with pytest.raises(EdgeAgentError) as info:
        parse_host_port(text)

    assert message in str(info.value)


# --- config check -----------------------------------------------------------------


def test_config_check_connect_accepts(broker, write_config, capsys):
    code, out, _ = run(capsys, "config", "check", "--connect", "--config", str(write_config(broker.port)))

    assert code == 0
    assert "result: ACCEPTED" in out


@needs_verified_chain
def test_config_check_connect_warns_backup(broker, write_config, pki, capsys):
    config = write_config(broker.port, broker={"pins": [str(pki.broker_pin), str(broker_ca_pin(pki))]})

    code, out, _ = run(capsys, "config", "check", "--connect", "--config", str(config))

    assert code == 0
    assert "warning: no configured pin is a backup" in out


def test_config_check_connect_fails_on_mismatch(broker, write_config, pki, capsys):
    config = write_config(broker.port, broker={"pins": [str(pki.spare_pin), f"sha256//{'A' * 43}="]})

    code, out, _ = run(capsys, "config", "check", "--connect", "--json", "--config", str(config))

    assert code == 1
    assert json.loads(out)["live_chain"]["accepted"] is False


def test_config_check_offline_notes_backup(write_config, capsys):
    code, out, _ = run(capsys, "config", "check", "--config", str(write_config()))

    assert code == 0
    assert "add --connect to check for a backup pin" in out


def test_config_check_warns_expiring(write_config, capsys):
    soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=5)).date().isoformat()
    config = write_config(broker={"pins_expire": soon})

    code, out, _ = run(capsys, "config", "check", "--config", str(config))

    assert code == 0
    assert f"warning: pin-set expires on {soon}, in 5 days" in out


# --- curl --pinnedpubkey ------------------------------------------------------------


def curl(broker, pki, pin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sv", "--max-time", "20", "--cacert", str(pki.broker_ca), "--cert", str(pki.observer_cert),
         "--key", str(pki.observer_key), "--pinnedpubkey", pin, f"https://127.0.0.1:{broker.port}/"],
        capture_output=True, text=True, timeout=60,
    )


def agent_pin(pki, capsys) -> str:
    main(["pin", str(pki.broker_cert)])
    return capsys.readouterr().out.split()[0]


def test_curl_accepts_agent_pin(broker, pki, capsys):
    pin = agent_pin(pki, capsys)

    result = curl(broker, pki, pin)

    # The handshake and pin check pass; Mosquitto then drops the HTTP request (curl exit 52 or 56).
    assert result.returncode not in (0, CURL_PIN_MISMATCH, 35, 60), result.stderr
    assert "SSL connection using TLS" in result.stderr
    assert f"public key hash: {pin}" in result.stderr
    assert "public key does not match pinned public key" not in result.stderr


def test_curl_accepts_agent_pin_list(broker, pki, capsys):
    pins = f"{pki.spare_pin};{agent_pin(pki, capsys)}"

    result = curl(broker, pki, pins)

    assert result.returncode != CURL_PIN_MISMATCH, result.stderr


def test_curl_rejects_wrong_pin(broker, pki):
    result = curl(broker, pki, str(pki.spare_pin))

    assert result.returncode == CURL_PIN_MISMATCH
    assert "public key does not match pinned public key" in result.stderr
