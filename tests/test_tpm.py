"""IDevID keys held in a software TPM: mutual TLS to a real Mosquitto, the self-test and its causes.

The TPM is swtpm behind tpm2-abrmd on a private D-Bus session bus. OpenSSL's
provider configuration applies to a whole process, so the agent runs as a
subprocess whenever it has to load the key itself.
"""

import base64
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from conftest import render_config
from edge_agent.asn1 import drop_ecdsa_null_parameters
from edge_agent.config import IdentityConfig
from edge_agent.devbroker import DevBroker, Observer
from edge_agent.devpki import DevPki, Issued, create_dev_pki, make_ca, new_key, write_certificates
from edge_agent.devtpm import SoftTpm, TpmIdevid, missing_tools, provision_tpm_idevid
from edge_agent.tpm import check_broker_ca, read_tss2_key, tpm_status
from edge_agent.tpm_provider import (
    NO_RESOURCE_MANAGER,
    NO_TPM,
    NOT_CONFIGURED,
    UNSUPPORTED_KEY,
    WRONG_BLOB,
    WRONG_CERTIFICATE,
    TpmError,
    config_path_from_argv,
    prepare_process,
    tcti_problem,
)

AGENT_SECONDS = 2.0


@dataclass(frozen=True)
class TpmPki:
    pki: DevPki
    manufacturer: Issued


@pytest.fixture(scope="module")
def soft_tpm(tmp_path_factory) -> Iterator[SoftTpm]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"software TPM not installed: {', '.join(missing)}; scripts/test installs them with apt-get")
    tpm = SoftTpm(tmp_path_factory.mktemp("tpm")).start()
    yield tpm
    tpm.stop()


@pytest.fixture(scope="module")
def tpm_pki(tmp_path_factory) -> TpmPki:
    # The manufacturer CA stays in memory so that the TPM key can be certified after the PKI exists.
    manufacturer = make_ca("edge-agent development manufacturer CA")
    return TpmPki(create_dev_pki(tmp_path_factory.mktemp("tpm-pki"), manufacturer=manufacturer), manufacturer)


@pytest.fixture(scope="module")
def tpm_idevid(soft_tpm: SoftTpm, tpm_pki: TpmPki, tmp_path_factory) -> TpmIdevid:
    folder = tmp_path_factory.mktemp("tpm-idevid")
    return provision_tpm_idevid(folder, soft_tpm, tpm_pki.manufacturer, "GW-TPM-0001")


@pytest.fixture
def tpm_environment(soft_tpm: SoftTpm, monkeypatch) -> dict:
    """Give this process and the agent subprocesses the software TPM's private bus."""
    for name, value in soft_tpm.environment.items():
        monkeypatch.setenv(name, value)
    return {**os.environ}


def tpm_settings(idevid: TpmIdevid, tpm_pki: TpmPki, tcti: str, **overrides) -> IdentityConfig:
    values = {
        "cert": idevid.cert_path,
        "key": idevid.key_path,
        "trust_anchors": (tpm_pki.pki.manufacturer_ca,),
        "key_source": "tpm",
        "tpm_tcti": tcti,
    }
    values.update(overrides)
    return IdentityConfig(**values)


def write_tpm_config(tmp_path: Path, tpm_pki: TpmPki, idevid: TpmIdevid, tcti: str, port: int, **identity) -> Path:
    identity_section = {
        "cert": str(idevid.cert_path),
        "key": str(idevid.key_path),
        "key_source": "tpm",
        "tpm_tcti": tcti,
        "trust_anchors": [str(tpm_pki.pki.manufacturer_ca)],
        **identity,
    }
    path = tmp_path / "agent-tpm.toml"
    path.write_text(render_config(tpm_pki.pki, port, tmp_path / "spool.db", identity=identity_section))
    return path


def run_agent(agent_command, config: Path, environment: dict, seconds: float = AGENT_SECONDS) -> subprocess.CompletedProcess:
    return subprocess.run(
        agent_command("run", "--config", str(config), "--duration", str(seconds), "--log-level", "debug"),
        capture_output=True, text=True, timeout=seconds + 60, env=environment,
    )


# --- mutual TLS with the TPM key ----------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tpm_key_mutual_tls(version, soft_tpm, tpm_pki, tpm_idevid, tpm_environment, agent_command, tmp_path):
    pki = tpm_pki.pki
    # Mosquitto's tls_version is a minimum, so TLS 1.2 is forced by capping the broker at 1.2.
    options = {"tls_max_version": "1.2"} if version == "1.2" else {"tls_version": "tlsv1.3"}
    with DevBroker(tmp_path / "broker", pki.broker_cert, pki.broker_key, pki.manufacturer_ca, **options) as broker:
        observer = Observer(broker, pki.broker_ca, pki.observer_cert, pki.observer_key).start()
        try:
            config = write_tpm_config(tmp_path, tpm_pki, tpm_idevid, soft_tpm.tcti, broker.port)
            result = run_agent(agent_command, config, tpm_environment)
            telemetry = observer.wait_for(1, "/telemetry", timeout_s=10)
        finally:
            observer.stop()
        log = broker.log()

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "is held by the TPM" in result.stderr
    assert f"over TLSv{version}" in result.stderr
    # use_identity_as_username: the broker took the TPM-held IDevID's CN as the user name.
    assert "u'GW-TPM-0001'" in log
    assert telemetry


def test_broker_caps_tls12(tpm_pki, tmp_path):
    # Proves that the TLS 1.2 case above cannot pass over TLS 1.3.
    pki = tpm_pki.pki
    context = ssl.create_default_context(cafile=str(pki.broker_ca))
    context.load_cert_chain(str(pki.observer_cert), str(pki.observer_key))
    with DevBroker(tmp_path / "broker", pki.broker_cert, pki.broker_key, pki.manufacturer_ca, tls_max_version="1.2") as broker:
        with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                version = sock.version()

    assert version == "TLSv1.2"


# --- the key is useless without its TPM -----------------------------------------


def test_key_fails_with_tpm_stopped(soft_tpm, tpm_pki, agent_command, tmp_path):
    # A TPM of its own, because this test stops it; soft_tpm only supplies the skip.
    tpm = SoftTpm(tmp_path / "tpm").start()
    try:
        idevid = provision_tpm_idevid(tmp_path, tpm, tpm_pki.manufacturer, "GW-TPM-0002")
        environment = {**os.environ, **tpm.environment}
        config = write_tpm_config(tmp_path, tpm_pki, idevid, tpm.tcti, port=1)

        tpm.stop_simulator()
        tpm_down = run_agent(agent_command, config, environment, seconds=1.0)
        tpm.stop()
        manager_down = run_agent(agent_command, config, environment, seconds=1.0)
    finally:
        tpm.stop()

    assert tpm_down.returncode == 1
    assert "Traceback" not in tpm_down.stderr
    assert "the TPM did not respond" in tpm_down.stderr
    assert manager_down.returncode == 1
    assert "Traceback" not in manager_down.stderr
    assert "tpm2-abrmd is not reachable" in manager_down.stderr


def _wait_for_log(broker: DevBroker, text: str, count: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = broker.log().count(text)
        if found >= count:
            return found
        time.sleep(0.1)
    return broker.log().count(text)


def _start_agent(agent_command, config: Path, environment: dict, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        agent_command("run", "--config", str(config), "--duration", str(seconds)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment,
    )


@dataclass
class AgentRun:
    tpm: SoftTpm
    broker: DevBroker
    agent: subprocess.Popen
    broker_user: str


@pytest.fixture
def own_tpm_agent(soft_tpm, tpm_pki, agent_command, tmp_path) -> Iterator[AgentRun]:
    """Run the agent with a key in a TPM of its own, for tests that restart that TPM."""
    pki = tpm_pki.pki
    tpm = SoftTpm(tmp_path / "tpm").start()
    try:
        idevid = provision_tpm_idevid(tmp_path, tpm, tpm_pki.manufacturer, "GW-TPM-0004")
        with DevBroker(tmp_path / "broker", pki.broker_cert, pki.broker_key, pki.manufacturer_ca) as broker:
            config = write_tpm_config(tmp_path, tpm_pki, idevid, tpm.tcti, broker.port)
            agent = _start_agent(agent_command, config, {**os.environ, **tpm.environment}, 30.0)
            try:
                yield AgentRun(tpm, broker, agent, "u'GW-TPM-0004'")
            finally:
                if agent.poll() is None:
                    agent.kill()
                agent.communicate()
    finally:
        tpm.stop()


def test_agent_survives_tpm_restart(own_tpm_agent):
    run = own_tpm_agent
    first = _wait_for_log(run.broker, run.broker_user, 1)

    # The restarted TPM no longer has the key the agent loaded; the broker restart forces a new handshake.
    run.tpm.stop_simulator()
    run.tpm.start_simulator()
    run.broker.restart()
    # Mosquitto appends to its log, so the second session is the second match.
    second = _wait_for_log(run.broker, run.broker_user, 2)
    run.agent.terminate()
    _, stderr = run.agent.communicate(timeout=30)

    assert first == 1
    assert second == 2
    assert run.agent.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_agent_exits_after_manager_restart(own_tpm_agent):
    run = own_tpm_agent
    connected = _wait_for_log(run.broker, run.broker_user, 1)

    run.tpm.restart_resource_manager()
    run.broker.restart()
    _, stderr = run.agent.communicate(timeout=60)

    assert connected == 1
    assert run.agent.returncode == 1
    assert "Traceback" not in stderr
    assert "lost its connection to the TPM resource manager" in stderr
    assert "restart the agent" in stderr


def test_key_blob_from_other_tpm(tpm_pki, tpm_idevid, soft_tpm, tpm_environment, tmp_path):
    other = SoftTpm(tmp_path / "other-tpm").start()
    try:
        foreign = provision_tpm_idevid(tmp_path, other, tpm_pki.manufacturer, "GW-TPM-0003")
    finally:
        other.stop()

    status = tpm_status(tpm_settings(foreign, tpm_pki, soft_tpm.tcti))

    assert status.cause == WRONG_BLOB
    assert status.responding is True
    assert "cannot load this key blob" in status.message


def test_agent_rejects_file_key_as_tpm(tpm_pki, tpm_idevid, soft_tpm, tpm_environment, agent_command, tmp_path):
    config = write_tpm_config(tmp_path, tpm_pki, tpm_idevid, soft_tpm.tcti, port=1, key=str(tpm_pki.pki.idevid_key))

    result = run_agent(agent_command, config, tpm_environment, seconds=1.0)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "'PRIVATE KEY' PEM, not a TPM-held key" in result.stderr


# --- the self-test and the status report ----------------------------------------


def test_status_reports_tpm_held_key(tpm_pki, tpm_idevid, soft_tpm, tpm_environment):
    status = tpm_status(tpm_settings(tpm_idevid, tpm_pki, soft_tpm.tcti))

    assert status.ok, status.message
    assert status.tpm_held
    assert status.responding is True
    assert status.key_loaded is True
    assert status.key_matches_certificate is True
    assert status.resource_manager == "tpm2-abrmd"
    assert "TPM-held key" in status.summary()


def test_status_wrong_certificate(tpm_pki, tpm_idevid, soft_tpm, tpm_environment):
    # The file-key IDevID's certificate, paired with the TPM key.
    settings = tpm_settings(tpm_idevid, tpm_pki, soft_tpm.tcti, cert=tpm_pki.pki.idevid_cert)

    status = tpm_status(settings)

    assert status.cause == WRONG_CERTIFICATE
    assert status.key_loaded is True
    assert status.key_matches_certificate is False
    assert "does not belong to the TPM key" in status.message


def test_identity_report_tpm_key_match(tpm_pki, tpm_idevid, soft_tpm, tpm_environment):
    from edge_agent.identity import validate_identity

    good = validate_identity(tpm_settings(tpm_idevid, tpm_pki, soft_tpm.tcti))
    wrong = validate_identity(tpm_settings(tpm_idevid, tpm_pki, soft_tpm.tcti, cert=tpm_pki.pki.idevid_cert))

    good_check = next(check for check in good.checks if check.id == "key-match")
    wrong_check = next(check for check in wrong.checks if check.id == "key-match")
    assert good.ok
    assert "TPM-held key" in good_check.message
    assert wrong_check.status == "error"
    assert "does not belong to the TPM key" in wrong_check.message


def test_status_for_file_key(tpm_pki):
    settings = IdentityConfig(cert=tpm_pki.pki.idevid_cert, key=tpm_pki.pki.idevid_key)

    status = tpm_status(settings)

    assert not status.tpm_held
    assert status.ok
    assert status.responding is None


def test_rsa4096_broker_ca_rejected(soft_tpm, tpm_environment, tmp_path):
    big_ca = make_ca("broker CA with RSA-4096", key=new_key("rsa-4096"))
    ca_file = write_certificates(tmp_path / "broker-ca-4096.pem", [big_ca.certificate])

    with pytest.raises(TpmError) as caught:
        check_broker_ca(ca_file, soft_tpm.tcti)

    assert caught.value.cause == UNSUPPORTED_KEY
    assert "RSA-4096" in str(caught.value)
    assert str(ca_file) in str(caught.value)


def test_p256_broker_ca_accepted(soft_tpm, tpm_pki, tpm_environment):
    check_broker_ca(tpm_pki.pki.broker_ca, soft_tpm.tcti)


# --- without a TPM ----------------------------------------------------------------


@pytest.mark.parametrize(
    "tcti, cause",
    [
        ("device:/dev/tpm0", NO_RESOURCE_MANAGER),
        ("swtpm:host=127.0.0.1,port=2321", NO_RESOURCE_MANAGER),
        ("mssim:host=127.0.0.1,port=2321", NO_RESOURCE_MANAGER),
        ("device:/dev/tpmrm97", NO_TPM),
    ],
)
def test_tcti_problem_names_cause(tcti, cause):
    problem = tcti_problem(tcti)

    assert problem is not None
    assert problem.cause == cause


def test_tcti_with_resource_manager_passes():
    assert tcti_problem("tabrmd:bus_type=session") is None


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--config", "a.toml"], "a.toml"),
        (["run", "--config=b.toml"], "b.toml"),
        (["config", "check", "-c", "c.toml"], "c.toml"),
        (["run", "-cd.toml"], "d.toml"),
        (["run"], "/etc/edge-agent/agent.toml"),
    ],
)
def test_config_path_from_argv(argv, expected):
    assert config_path_from_argv(argv) == Path(expected)


def test_prepare_after_ssl_leaves_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENSSL_CONF", raising=False)
    config = tmp_path / "agent.toml"
    config.write_text('[identity]\nkey_source = "tpm"\ntpm_tcti = "tabrmd:bus_type=session"\n')

    setup = prepare_process(["run", "--config", str(config)])

    # pytest has imported ssl already, so OpenSSL can no longer be configured here.
    assert setup.requested
    assert not setup.applied
    assert setup.problem.cause == NOT_CONFIGURED
    assert "OPENSSL_CONF" not in os.environ


def test_cli_import_leaves_openssl_alone():
    # prepare_process runs in main(), so importing the CLI must not initialise OpenSSL.
    code = (
        "import sys; from edge_agent.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('_ssl', '_hashlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_default_config_path_matches():
    from edge_agent import config, tpm_provider

    assert tpm_provider.DEFAULT_CONFIG_PATH == config.DEFAULT_CONFIG_PATH


# --- the key blob -----------------------------------------------------------------


def _tss2_pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN TSS2 PRIVATE KEY-----\n" + body + b"-----END TSS2 PRIVATE KEY-----\n"


def _tss2_der(oid_body: bytes, empty_auth: bool) -> bytes:
    fields = b"\x06" + bytes([len(oid_body)]) + oid_body
    if empty_auth:
        fields += b"\xa0\x03\x01\x01\xff"
    fields += b"\x02\x04\x40\x00\x00\x01" + b"\x04\x02ab" + b"\x04\x02cd"
    return b"\x30" + bytes([len(fields)]) + fields


LOADABLE_OID_BODY = bytes.fromhex("6781050a0103")
IMPORTABLE_OID_BODY = bytes.fromhex("6781050a0104")


def test_tss2_blob_fields(tmp_path):
    path = tmp_path / "key.pem"
    path.write_bytes(_tss2_pem(_tss2_der(LOADABLE_OID_BODY, empty_auth=True)))

    key = read_tss2_key(path)

    assert key.key_type == "2.23.133.10.1.3"
    assert key.empty_auth
    assert key.parent == 0x40000001


@pytest.mark.parametrize(
    "oid_body, empty_auth, message",
    [(IMPORTABLE_OID_BODY, True, "importable key"), (LOADABLE_OID_BODY, False, "authorization value")],
)
def test_tss2_blob_rejected(oid_body, empty_auth, message, tmp_path):
    from edge_agent.tpm import check_tpm_key_file

    path = tmp_path / "key.pem"
    path.write_bytes(_tss2_pem(_tss2_der(oid_body, empty_auth)))
    path.chmod(0o600)

    with pytest.raises(TpmError, match=message):
        check_tpm_key_file(path)


def test_tss2_blob_damaged(tmp_path):
    path = tmp_path / "key.pem"
    path.write_bytes(b"-----BEGIN TSS2 PRIVATE KEY-----\nMIIB!!\n-----END TSS2 PRIVATE KEY-----\n")

    with pytest.raises(TpmError, match="damaged"):
        read_tss2_key(path)


def test_tss2_blob_readable_by_group(tmp_path):
    from edge_agent.errors import IdentityError
    from edge_agent.tpm import check_tpm_key_file

    path = tmp_path / "key.pem"
    path.write_bytes(_tss2_pem(_tss2_der(LOADABLE_OID_BODY, empty_auth=True)))
    path.chmod(0o640)

    with pytest.raises(IdentityError, match="chmod 600"):
        check_tpm_key_file(path)


# --- CSRs signed in the TPM ---------------------------------------------------------


def _der_sequence(body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        encoded = bytes([length])
    elif length < 0x100:
        encoded = bytes([0x81, length])
    else:
        encoded = bytes([0x82]) + length.to_bytes(2, "big")
    return b"\x30" + encoded + body


def test_ecdsa_null_parameters_dropped():
    from edge_agent.asn1 import read_tlv

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "GW-1")]))
        .sign(new_key("ec-p256"), hashes.SHA256())
    )
    clean = csr.public_bytes(serialization.Encoding.DER)
    # Re-encode it as the tpm2 provider does: NULL parameters after ecdsa-with-SHA256.
    _, body, _ = read_tlv(clean)
    algorithm = bytes.fromhex("300a06082a8648ce3d040302")
    with_null = bytes.fromhex("300c06082a8648ce3d0403020500")
    tampered = _der_sequence(body.replace(algorithm, with_null, 1))

    repaired = drop_ecdsa_null_parameters(tampered)

    assert tampered != clean
    assert repaired == clean
    assert x509.load_der_x509_csr(repaired).is_signature_valid
