"""The service keeps cryptography out of its process: identity work runs in a child process."""

import datetime
import logging
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from edge_agent import isolated
from edge_agent.config import load_config
from edge_agent.credential import ClientCredential, load_credential, load_credential_isolated
from edge_agent.devpki import issue_idevid, make_ca, new_key
from edge_agent.entropy import EntropyGate
from edge_agent.errors import IdentityError
from edge_agent.identity import load_identity
from edge_agent.thermal import ThermalGovernor
from edge_agent.tls import create_client_context, der_key_as_pem, load_client_certificate
from edge_agent.verify import Verifier
from identity_pki import key_bytes, write_bytes

Encoding = serialization.Encoding
PrivateFormat = serialization.PrivateFormat
UTC = datetime.timezone.utc


@pytest.fixture(scope="module")
def ca():
    return make_ca("isolation test CA")


def credential_for(tmp_path: Path, ca, key, key_data: bytes, passphrase=None) -> ClientCredential:
    device = issue_idevid(ca, "ISO-0001", key=key)
    return ClientCredential(
        role="IDevID",
        subject="CN=ISO-0001",
        cert_path=tmp_path / "device.pem",
        key_path=write_bytes(tmp_path / "device.key", key_data, mode=0o600),
        chain_pem=device.certificate.public_bytes(Encoding.PEM),
        device_id="ISO-0001",
        device_id_source="test",
        key_passphrase=passphrase,
    )


# --- DER keys reach OpenSSL as PEM without cryptography -------------------------


@pytest.mark.parametrize(
    "kind, fmt",
    [
        ("rsa-2048", PrivateFormat.TraditionalOpenSSL),
        ("ec-p384", PrivateFormat.TraditionalOpenSSL),
        ("ec-p256", PrivateFormat.PKCS8),
    ],
    ids=["pkcs1", "sec1", "pkcs8"],
)
def test_der_key_loads_into_context(tmp_path, ca, kind, fmt):
    key = new_key(kind)
    credential = credential_for(tmp_path, ca, key, key_bytes(key, encoding=Encoding.DER, fmt=fmt))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    # OpenSSL raises "key values mismatch" when the key does not belong to the certificate.
    load_client_certificate(context, credential)


def test_encrypted_der_key_with_passphrase(tmp_path, ca):
    key = new_key("ec-p256")
    data = key_bytes(key, encoding=Encoding.DER, passphrase=b"s3cret pass")
    credential = credential_for(tmp_path, ca, key, data, passphrase=b"s3cret pass")

    load_client_certificate(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), credential)


def test_encrypted_der_key_without_passphrase(tmp_path, ca):
    key = new_key("ec-p256")
    data = key_bytes(key, encoding=Encoding.DER, passphrase=b"s3cret pass")
    credential = credential_for(tmp_path, ca, key, data)

    with pytest.raises(IdentityError) as info:
        load_client_certificate(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), credential)

    assert "encrypted and no passphrase is configured" in str(info.value)


def test_padded_der_key_is_trimmed(tmp_path, ca):
    key = new_key("ec-p256")
    data = key_bytes(key, encoding=Encoding.DER) + b"\xff" * 40

    pem = der_key_as_pem(tmp_path / "device.key", data)

    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert pem.endswith(b"-----END PRIVATE KEY-----\n")
    assert max(len(line) for line in pem.splitlines()) <= 64


@pytest.mark.parametrize("data", [b"", b"\x30\x03\x02\x01", b"\x30\x03\x05\x01\x00", b"\x02\x01\x00"])
def test_not_a_der_key(tmp_path, data):
    with pytest.raises(IdentityError) as info:
        der_key_as_pem(tmp_path / "device.key", data)

    assert str(tmp_path / "device.key") in str(info.value)
    assert "not a PEM or DER private key" in str(info.value)


@given(st.binary(max_size=64))
def test_random_bytes_never_crash_key_wrapper(data):
    try:
        pem = der_key_as_pem(Path("device.key"), data)
    except IdentityError as exc:
        assert "device.key" in str(exc)
    else:
        assert pem.startswith(b"-----BEGIN ")


# --- the child process ------------------------------------------------------------


def test_isolated_credential_equals_in_process(pki, write_config):
    config = load_config(write_config())

    assert load_credential_isolated(config.identity) == load_credential(config.identity)


def test_isolated_credential_hides_passphrase(pki, write_config):
    credential = load_credential_isolated(load_config(write_config()).identity)

    assert "key_passphrase" not in repr(credential)
    assert credential.chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")


def test_isolated_error_keeps_message(pki, write_config, tmp_path):
    wrong_anchor = tmp_path / "other-ca.pem"
    wrong_anchor.write_bytes(make_ca("unrelated CA").certificate.public_bytes(Encoding.PEM))
    config = load_config(write_config(identity={"trust_anchors": [str(wrong_anchor)]}))

    with pytest.raises(IdentityError) as isolated_error:
        load_credential_isolated(config.identity)
    with pytest.raises(IdentityError) as in_process_error:
        load_credential(config.identity)

    assert str(isolated_error.value) == str(in_process_error.value)
    assert isolated_error.value.check == "chain"
    assert isolated_error.value.path == str(pki.idevid_cert)


def test_child_log_reaches_parent_logger(pki, write_config, caplog):
    config = load_config(write_config())

    with caplog.at_level(logging.INFO):
        credential = load_credential_isolated(config.identity)

    records = [r for r in caplog.records if r.name == "edge_agent.identity"]
    assert records, caplog.text
    assert credential.device_id in records[-1].getMessage()


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError) as info:
        isolated.call("os.system", "true")

    assert "load_credential" in str(info.value)


def test_isolated_verification_matches_in_process(broker, write_config):
    config = load_config(write_config(broker.port))
    context = create_client_context(config.broker, load_identity(config.identity))
    moment = datetime.datetime(2027, 1, 1, tzinfo=UTC)
    reports = []
    for isolate in (False, True):
        gate = EntropyGate(config.entropy)
        verifier = Verifier(gate, ThermalGovernor(config.thermal), start=0.0, first_run_delay_s=0.0,
                            wall_clock=lambda: moment, isolate=isolate)
        reports.append(verifier.run(time.monotonic(), config, context))

    in_process, in_child = reports
    assert in_child.result == "ok", in_child.identity.detail
    assert in_child.identity == in_process.identity
    assert in_child.broker == in_process.broker
    assert in_child.broker.expiry.not_after is not None


# --- the service ------------------------------------------------------------------


def mapped_files(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_service_never_maps_cryptography(broker, observer, write_config, agent_command):
    config = write_config(broker.port, telemetry={"interval_s": 0.5})
    process = subprocess.Popen(agent_command("run", "--config", str(config)), stderr=subprocess.PIPE, text=True)
    try:
        observer.wait_for(2, "/telemetry", timeout_s=20)
        maps = mapped_files(process.pid)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)

    assert "_ssl" in maps or "libssl" in maps
    assert "cryptography" not in maps
    assert "Traceback" not in stderr
