"""The optional LDevID: configuration, selection over the IDevID, and TLS to a real Mosquitto."""

import logging
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge_agent.config import LDevIDConfig, load_config
from edge_agent.devbroker import DevBroker
from edge_agent.devpki import Issued, issue_idevid, make_ca, write_certificates, write_private_key
from edge_agent.errors import ConfigError, IdentityError
from edge_agent.identity import DeviceIdentity, load_identity, validate_identity
from edge_agent.tls import create_client_context
from identity_pki import key_bytes, write_bytes, write_key


@pytest.fixture(scope="module")
def owner_ca() -> Issued:
    return make_ca("owner LDevID CA")


@pytest.fixture
def ldevid_files(tmp_path, owner_ca, pki):
    """An LDevID for the development IDevID's device, issued by the owner CA."""
    ldevid = issue_idevid(owner_ca, pki.device_serial, common_name=f"owner-{pki.device_serial}")
    folder = tmp_path / "ldevid"
    folder.mkdir()
    return {
        "cert": str(write_certificates(folder / "ldevid.pem", [ldevid.certificate])),
        "key": str(write_private_key(folder / "ldevid.key", ldevid.key)),
        "trust_anchors": [str(write_certificates(folder / "owner-ca.pem", [owner_ca.certificate]))],
    }


def write_ldevid_config(write_config, ldevid: dict, port: int = 1):
    path = write_config(port)
    lines = [f"{key} = {value!r}".replace("'", '"') for key, value in ldevid.items()]
    path.write_text(path.read_text() + "\n[identity.ldevid]\n" + "\n".join(lines) + "\n")
    return path


# --- configuration ---------------------------------------------------------


def test_ldevid_table_loads(write_config, ldevid_files):
    config = load_config(write_ldevid_config(write_config, ldevid_files))

    assert isinstance(config.identity.ldevid, LDevIDConfig)
    assert str(config.identity.ldevid.cert) == ldevid_files["cert"]
    assert config.to_dict()["identity"]["ldevid"]["key"] == ldevid_files["key"]


def test_ldevid_relative_paths(write_config, ldevid_files, tmp_path):
    config = load_config(write_ldevid_config(write_config, {**ldevid_files, "cert": "ldevid/ldevid.pem"}))

    assert config.identity.ldevid.cert == tmp_path / "ldevid" / "ldevid.pem"


def test_ldevid_unknown_key_rejected(write_config, ldevid_files):
    with pytest.raises(ConfigError) as info:
        load_config(write_ldevid_config(write_config, {**ldevid_files, "trust_anchor": ["x.pem"]}))

    assert "identity.ldevid.trust_anchor: unknown key; did you mean 'trust_anchors'?" in str(info.value)


def test_ldevid_missing_key_named(write_config, ldevid_files):
    del ldevid_files["key"]

    with pytest.raises(ConfigError) as info:
        load_config(write_ldevid_config(write_config, ldevid_files))

    assert "identity.ldevid.key: missing required key" in str(info.value)


def test_ldevid_wrong_type_rejected(write_config):
    path = write_config()
    path.write_text(path.read_text().replace("[identity]\n", '[identity]\nldevid = "ldevid.pem"\n'))

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert "identity.ldevid: expected a table, got a string 'ldevid.pem'" in str(info.value)


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({"key_types": ["ec-p256", "dsa-1024"]}, "identity.key_types: invalid value 'dsa-1024'"),
        ({"key_types": []}, "identity.key_types: expected a non-empty list"),
        ({"device_id_source": "mac"}, "identity.device_id_source: invalid value 'mac'"),
        ({"key_passphrase_credential": "../secret"}, "identity.key_passphrase_credential: invalid credential name"),
    ],
)
def test_identity_settings_validated(write_config, setting, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(identity=setting))

    assert expected in str(info.value)


# --- selection -------------------------------------------------------------


def test_valid_ldevid_is_used(write_config, ldevid_files, pki):
    config = load_config(write_ldevid_config(write_config, ldevid_files))

    identity = load_identity(config.identity, config.device_id)

    assert identity.role == "LDevID"
    assert str(identity.cert_path) == ldevid_files["cert"]
    assert identity.device_id == pki.device_serial
    assert identity.report.selection.status == "ok"


def test_invalid_ldevid_falls_back(write_config, ldevid_files, pki, caplog):
    ldevid_files["trust_anchors"] = [str(pki.manufacturer_ca)]
    config = load_config(write_ldevid_config(write_config, ldevid_files))

    with caplog.at_level(logging.WARNING, logger="edge_agent.identity"):
        identity = load_identity(config.identity, config.device_id)

    assert identity.role == "IDevID"
    assert identity.cert_path == pki.idevid_cert
    assert identity.report.selection.status == "warning"
    assert "is not used because its chain check failed" in caplog.text
    assert "the IDevID is the TLS client certificate" in caplog.text


def test_missing_ldevid_file_falls_back(write_config, ldevid_files, tmp_path):
    ldevid_files["cert"] = str(tmp_path / "not-enrolled-yet.pem")
    config = load_config(write_ldevid_config(write_config, ldevid_files))

    report = validate_identity(config.identity)

    assert report.selected_role == "IDevID"
    assert "not-enrolled-yet.pem" in report.selection.message
    assert "certificate check failed" in report.selection.message


def test_no_usable_identity_raises(write_config, tmp_path, pki):
    other_key = write_key(tmp_path / "other.key", issue_idevid(make_ca("x"), "X").key)
    config = load_config(write_config(identity={"key": str(other_key)}))

    with pytest.raises(IdentityError) as info:
        load_identity(config.identity)

    assert "IDevID key-match check failed" in str(info.value)
    assert info.value.check == "key-match"


def test_report_lists_both_credentials(write_config, ldevid_files):
    config = load_config(write_ldevid_config(write_config, ldevid_files))

    report = validate_identity(config.identity)

    assert [c.role for c in report.credentials] == ["IDevID", "LDevID"]
    assert report.checks[-1].id == "selection"
    assert {c.credential for c in report.checks} == {"IDevID", "LDevID"}
    assert report.to_dict()["selected"] == "LDevID"


# --- TLS -------------------------------------------------------------------


def test_tls_never_prompts_for_passphrase(tmp_path, write_config, pki):
    config = load_config(write_config())
    encrypted = write_key(tmp_path / "encrypted.key", _load_key(pki.idevid_key), passphrase=b"pass phrase")
    identity = load_identity(config.identity)
    without_passphrase = DeviceIdentity(
        cert_path=identity.cert_path, key_path=encrypted, certificate=identity.certificate, chain=(),
        device_id=identity.device_id, device_id_source=identity.device_id_source,
    )

    with pytest.raises(IdentityError) as info:
        create_client_context(config.broker, without_passphrase)

    assert "encrypted and no passphrase is configured" in str(info.value)


def test_tls_loads_padded_der_key(tmp_path, write_config, pki):
    config = load_config(write_config())
    identity = load_identity(config.identity)
    padded = write_bytes(tmp_path / "padded.key", key_bytes(_load_key(pki.idevid_key), encoding=serialization.Encoding.DER) + b"\xff" * 64, 0o600)
    der_identity = DeviceIdentity(
        cert_path=identity.cert_path, key_path=padded, certificate=identity.certificate, chain=(),
        device_id=identity.device_id, device_id_source=identity.device_id_source,
    )

    context = create_client_context(config.broker, der_identity)

    assert isinstance(context, ssl.SSLContext)


@pytest.mark.broker
def test_broker_sees_ldevid(tmp_path, pki, owner_ca, ldevid_files, write_config, agent_command, mosquitto_binary):
    client_cas = write_certificates(tmp_path / "client-cas.pem", [_load_cert(pki.manufacturer_ca), owner_ca.certificate])
    broker = DevBroker(tmp_path / "broker", pki.broker_cert, pki.broker_key, client_cas).start()
    try:
        config = write_ldevid_config(write_config, ldevid_files, port=broker.port)
        result = subprocess.run(
            agent_command("run", "--config", str(config), "--duration", "1.5"),
            capture_output=True, text=True, timeout=60,
        )
        log = broker.log()
    finally:
        broker.stop()

    assert result.returncode == 0, result.stderr
    # use_identity_as_username: the broker took the LDevID's CN as the user name.
    assert f"owner-{pki.device_serial}" in log


def _load_key(path):
    return serialization.load_pem_private_key(path.read_bytes(), None)


def _load_cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())
