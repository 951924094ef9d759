"""IDevID keys held in a TPM 2.0: the key blob, the start-up self-test, the status report, the TLS hook.

With ``identity.key_source = "tpm"`` the key file is a ``TSS2 PRIVATE KEY``
PEM: the private key wrapped by a key that never leaves the TPM, useless
without that TPM. Python's ``ssl`` loads it through the tpm2 OpenSSL provider
(configured by ``edge_agent.tpm_provider`` before OpenSSL starts), and every
TLS signature is made inside the TPM.

The self-test runs the ``openssl`` command in a child process rather than a
loopback TLS handshake in this one. ``ssl`` cannot sign arbitrary data, and
``cryptography`` uses its own OpenSSL without the provider. A handshake in
this process would block inside OpenSSL, where nothing can interrupt a TPM
that stopped responding, whereas a child is killed after ``PROBE_TIMEOUT_S``
and its error output names the cause. The in-process path is exercised right
after, when ``load_cert_chain`` loads the key through the provider and
compares its public key with the certificate.
"""

import base64
import binascii
import hashlib
import logging
import os
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Set, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from edge_agent.asn1 import DerError, _decode_oid, read_tlv
from edge_agent.certfiles import load_certificates, read_file
from edge_agent.config import BrokerConfig, IdentityConfig, secret_file_mode_problem
from edge_agent.errors import IdentityError
from edge_agent.identity import CredentialFiles
from edge_agent.identity_checks import ERROR, OK, CheckResult
from edge_agent.pinning import pin_from_certificate, pin_from_spki_der
from edge_agent.tls import create_client_context, load_client_certificate
from edge_agent.tpm_provider import (
    NO_TPM,
    NOT_CONFIGURED,
    PROBE_TIMEOUT_S,
    PROVIDER_FAILED,
    UNSUPPORTED_KEY,
    WRONG_BLOB,
    WRONG_CERTIFICATE,
    TpmError,
    openssl_error_summary,
    probe_provider,
    process_setup,
    resource_manager,
    run_openssl,
    tcti_problem,
)

if TYPE_CHECKING:
    from edge_agent.tls import Credential

logger = logging.getLogger(__name__)

_TSS2_PEM_BEGIN = b"-----BEGIN TSS2 PRIVATE KEY-----"
_TSS2_PEM_END = b"-----END TSS2 PRIVATE KEY-----"
# TCG "TSS 2.0 Privkey" key types: a key already wrapped for loading under its parent.
LOADABLE_KEY_OID = "2.23.133.10.1.3"
_KEY_TYPE_NAMES = {
    LOADABLE_KEY_OID: "a loadable key",
    "2.23.133.10.1.4": "an importable key",
    "2.23.133.10.1.5": "sealed data",
}


# --- the key blob -------------------------------------------------------------


@dataclass(frozen=True)
class Tss2Key:
    """The fields of a TSS2 PRIVATE KEY blob that can be read without the TPM."""

    key_type: str
    empty_auth: bool
    parent: int


def read_tss2_key(path: Path) -> Tss2Key:
    """Parse the TSS2 PRIVATE KEY PEM at ``path``; raise TpmError (wrong-blob) for anything else."""
    data = read_file(path, "TPM key blob")
    if _TSS2_PEM_BEGIN not in data:
        raise TpmError(WRONG_BLOB, f"{path}: {_describe_non_tss2(data)}", str(path))

    body = data.split(_TSS2_PEM_BEGIN, 1)[1].split(_TSS2_PEM_END, 1)[0]
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
        return _parse_tss2_der(der)
    except (binascii.Error, DerError) as exc:
        raise TpmError(
            WRONG_BLOB, f"{path}: the TSS2 PRIVATE KEY is damaged ({exc}); provision the key again", str(path)
        ) from None


def _describe_non_tss2(data: bytes) -> str:
    if b"-----BEGIN" in data:
        label = data.split(b"-----BEGIN", 1)[1].split(b"-----", 1)[0].strip().decode(errors="replace")
        return (
            f"the file is a '{label}' PEM, not a TPM-held key (TSS2 PRIVATE KEY); set identity.key_source = \"file\" "
            "for a key in a file, or point identity.key at the blob provisioned in the TPM"
        )
    return "the file is not a TSS2 PRIVATE KEY PEM; point identity.key at the blob provisioned in the TPM"


def _parse_tss2_der(der: bytes) -> Tss2Key:
    # TSSPrivKey ::= SEQUENCE { type OBJECT IDENTIFIER, emptyAuth [0] EXPLICIT BOOLEAN OPTIONAL,
    #                           parent INTEGER, pubkey OCTET STRING, privkey OCTET STRING }
    tag, body, _ = read_tlv(der)
    if tag != 0x30:
        raise DerError("the key is not a DER SEQUENCE")
    tag, oid, position = read_tlv(body)
    if tag != 0x06:
        raise DerError("the key type is not an OBJECT IDENTIFIER")
    empty_auth = False
    tag, value, next_position = read_tlv(body, position)
    if tag == 0xA0:
        inner_tag, flag, _ = read_tlv(value)
        empty_auth = inner_tag == 0x01 and flag != b"\x00"
        position = next_position
        tag, value, next_position = read_tlv(body, position)
    if tag != 0x02:
        raise DerError("the parent handle is not an INTEGER")
    return Tss2Key(key_type=_decode_oid(oid), empty_auth=empty_auth, parent=int.from_bytes(value, "big"))


def check_tpm_key_file(path: Path, passphrase_setting: Optional[str] = None) -> Tss2Key:
    """Check, without the TPM, that ``path`` is a private, loadable TSS2 key blob.

    ``passphrase_setting`` names a configured passphrase setting, which a
    TPM-held key cannot use.
    """
    problem = secret_file_mode_problem(path) if path.exists() else None
    if problem:
        raise IdentityError(problem, str(path), "key-permissions")

    key = read_tss2_key(path)
    if key.key_type != LOADABLE_KEY_OID:
        name = _KEY_TYPE_NAMES.get(key.key_type, f"unknown type {key.key_type}")
        raise TpmError(
            WRONG_BLOB,
            f"{path}: the blob contains {name}, expected a loadable key (OID {LOADABLE_KEY_OID}); provision the "
            "IDevID key with 'openssl genpkey -provider tpm2' or tpm2-tools",
            str(path),
        )
    if not key.empty_auth:
        raise TpmError(
            WRONG_BLOB,
            f"{path}: the TPM key needs an authorization value, which the agent cannot supply unattended; "
            "provision the IDevID key with an empty authorization",
            str(path),
        )
    if passphrase_setting is not None:
        raise IdentityError(
            f"{passphrase_setting}: a TPM-held key has no passphrase; remove the setting", str(path), "key-passphrase"
        )
    return key


def _passphrase_setting(files: CredentialFiles) -> Optional[str]:
    if files.key_passphrase_file is not None:
        return f"{files.setting}.key_passphrase_file"
    if files.key_passphrase_credential is not None:
        return f"{files.setting}.key_passphrase_credential"
    return None


def check_tpm_key_match(files: CredentialFiles, leaf: x509.Certificate) -> CheckResult:
    """Run the key-match check of identity validation for a TPM-held key.

    The TPM signs a fresh nonce that the certificate's public key must verify,
    which also shows that the TPM responds and accepts the blob. A failure is
    returned as an error result with the cause, not raised.
    """
    try:
        check_tpm_key_file(files.key, _passphrase_setting(files))
        self_test(files.cert, files.key, files.tpm_tcti, leaf)
    except IdentityError as exc:
        return CheckResult("key-match", ERROR, str(exc), files.role)
    return CheckResult(
        "key-match", OK,
        f"the TPM-held key {files.key} signed a nonce that the certificate's key verifies (TCTI {files.tpm_tcti})",
        files.role,
    )


# --- the self-test --------------------------------------------------------------


def self_test(
    cert_path: Path, key_path: Path, tcti: str, certificate: x509.Certificate, timeout_s: float = PROBE_TIMEOUT_S
) -> float:
    """Sign a fresh nonce in the TPM and verify it with the certificate's key; return the seconds it took.

    Raises TpmError whose ``cause`` names what is wrong: no TPM, no resource
    manager, a blob this TPM cannot load, or a certificate for another key.
    Each child process is bounded by ``timeout_s``.
    """
    start = time.monotonic()
    problem = tcti_problem(tcti)
    if problem is not None:
        raise problem
    sign_and_verify_nonce(cert_path, key_path, tcti, certificate, timeout_s)
    return time.monotonic() - start


def sign_and_verify_nonce(
    cert_path: Path, key_path: Path, tcti: str, certificate: x509.Certificate, timeout_s: float = PROBE_TIMEOUT_S
) -> None:
    """Sign the SHA-256 of a fresh nonce with the TPM key and verify it with the certificate's public key."""
    digest = hashlib.sha256(os.urandom(32)).digest()
    signature = _sign_digest(key_path, tcti, digest, timeout_s)
    if _signature_verifies(certificate.public_key(), signature, digest):
        return
    tpm_pin = _tpm_key_pin(key_path, tcti, timeout_s)
    raise TpmError(
        WRONG_CERTIFICATE,
        f"{cert_path}: the certificate (subject {certificate.subject.rfc4514_string()}, key pin "
        f"{pin_from_certificate(certificate)}) does not belong to the TPM key {key_path} (key pin {tpm_pin}); "
        "install the certificate that was issued for this TPM key",
        str(cert_path),
    )


def _sign_digest(key_path: Path, tcti: str, digest: bytes, timeout_s: float) -> bytes:
    arguments = ["pkeyutl", "-sign", "-inkey", str(key_path), "-pkeyopt", "digest:sha256"]
    result = run_openssl(arguments, tcti, timeout_s, stdin=digest)
    if result.returncode == 0 and result.stdout:
        return result.stdout

    # A TPM that does not respond also makes the key unreadable, so the probe separates the two causes.
    problem = probe_provider(tcti, timeout_s)
    if problem is not None:
        raise problem
    stderr = result.stderr.decode(errors="replace")
    if "Could not read private key" in stderr or "cannot load key" in stderr:
        raise TpmError(
            WRONG_BLOB,
            f"{key_path}: the TPM (TCTI '{tcti}') cannot load this key blob ({openssl_error_summary(stderr)}); "
            "it was made by another TPM, under another parent key, or the TPM was cleared since; provision the "
            "IDevID key on this TPM",
            str(key_path),
        )
    raise TpmError(
        NO_TPM,
        f"{key_path}: signing in the TPM (TCTI '{tcti}') failed: {openssl_error_summary(stderr)}",
        str(key_path),
    )


def _signature_verifies(public_key, signature: bytes, digest: bytes) -> bool:
    prehashed = Prehashed(hashes.SHA256())
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, digest, ec.ECDSA(prehashed))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, digest, padding.PKCS1v15(), prehashed)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _tpm_key_pin(key_path: Path, tcti: str, timeout_s: float) -> str:
    result = run_openssl(["pkey", "-in", str(key_path), "-pubout", "-outform", "DER"], tcti, timeout_s)
    if result.returncode != 0 or not result.stdout:
        return "unknown"
    return str(pin_from_spki_der(result.stdout))


# --- the broker's CA ------------------------------------------------------------


def describe_public_key(public_key) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    return type(public_key).__name__.replace("PublicKey", "")


def check_broker_ca(ca_file: Path, tcti: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Check that the TPM can verify signatures made by the keys of the broker's CA certificates.

    With ``?tpm2.signature`` preferred, OpenSSL verifies the broker's chain
    inside the TPM too, and a TPM rejects key types it cannot load (RSA-4096
    on most TPMs). Each self-signed CA is verified by a child ``openssl`` with
    the agent's configuration; other CA keys cannot be exercised in advance
    and are only logged.
    """
    checked = set()
    for certificate in load_certificates(ca_file, "broker CA file"):
        key_name = describe_public_key(certificate.public_key())
        if certificate.issuer != certificate.subject:
            if key_name not in checked:
                # NOTE: the broker's own certificate and intermediates arrive only in the
                # handshake; a key type the TPM rejects fails there as "certificate signature failure".
                logger.warning(
                    "broker CA %s (%s) in %s is not self-signed, so whether the TPM accepts its %s key is known "
                    "only at the handshake", certificate.subject.rfc4514_string(), key_name, ca_file, key_name,
                )
            continue
        _probe_ca_signature(ca_file, certificate, key_name, tcti, timeout_s)
        checked.add(key_name)


def _probe_ca_signature(ca_file: Path, certificate: x509.Certificate, key_name: str, tcti: str, timeout_s: float) -> None:
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    # -check_ss_sig verifies the self-signature, which OpenSSL skips by default for
    # a trust anchor; -no_check_time keeps the clock out of this key-type check.
    arguments = ["verify", "-check_ss_sig", "-no_check_time", "-CAfile", str(ca_file)]
    result = run_openssl(arguments, tcti, timeout_s, stdin=pem)
    if result.returncode == 0:
        return
    stderr = result.stderr.decode(errors="replace") + result.stdout.decode(errors="replace")
    if "tpm2:" in stderr:
        raise TpmError(
            UNSUPPORTED_KEY,
            f"broker.ca_file {ca_file}: the TPM cannot verify signatures of the CA {certificate.subject.rfc4514_string()} "
            f"({key_name} key: {openssl_error_summary(stderr)}); with identity.key_source = \"tpm\" OpenSSL verifies "
            "the broker's chain inside the TPM, so every handshake would fail; use a broker CA with an EC P-256 or "
            "RSA-2048 key, or a key in a file",
            str(ca_file),
        )
    logger.warning("broker CA %s in %s did not verify in the TPM check: %s",
                   certificate.subject.rfc4514_string(), ca_file, openssl_error_summary(stderr))


# --- the TLS hook ---------------------------------------------------------------

# Broker CA files already checked (path, mtime, size, TCTI) and keys already
# attached in this process.
_checked_ca_files: Set[Tuple[str, int, int, str]] = set()
_attached_keys: Set[Path] = set()


def attach_tpm_identity(context: ssl.SSLContext, identity: "Credential", ca_file: Path) -> None:
    """Self-test the TPM key, check the broker's CA, then present the key as the TLS client certificate."""
    # The TPM responded to the probe in prepare_process, at the start of this process.
    _check_process_setup(identity)
    start = time.monotonic()
    # NOTE: verifying the self-test signature loads cryptography into the service, about 10 MB
    # more resident memory than with a key file.
    leaf = x509.load_pem_x509_certificate(identity.chain_pem)
    sign_and_verify_nonce(identity.cert_path, identity.key_path, identity.tpm_tcti, leaf)
    elapsed = time.monotonic() - start
    # A rebuilt context after a failed attempt skips a CA file checked before, unless it changed.
    ca_stat = ca_file.stat()
    ca_version = (str(ca_file), ca_stat.st_mtime_ns, ca_stat.st_size, identity.tpm_tcti)
    if ca_version not in _checked_ca_files:
        check_broker_ca(ca_file, identity.tpm_tcti)
        _checked_ca_files.add(ca_version)

    try:
        load_client_certificate(context, identity)
    except ssl.SSLError as exc:
        raise TpmError(
            PROVIDER_FAILED,
            f"{identity.key_path}: the tpm2 provider in this process could not load the TPM key ({exc.reason or exc}), "
            "although a separate openssl process could; the provider may have lost its connection to the TPM "
            "resource manager since the agent started; restart the agent",
            str(identity.key_path),
        ) from None
    # Info once per key, because the context is rebuilt after every failed connection attempt.
    level = logging.DEBUG if identity.key_path in _attached_keys else logging.INFO
    _attached_keys.add(identity.key_path)
    logger.log(
        level, "device key %s is held by the TPM (TCTI %s); self-test signed and verified a nonce in %.0f ms",
        identity.key_path, identity.tpm_tcti, elapsed * 1000,
    )


def refresh_tpm_context(broker: BrokerConfig, identity: "Credential", current: ssl.SSLContext) -> ssl.SSLContext:
    """Build the TLS context again after a failed connection attempt with a TPM-held key.

    A TPM restart drops the key that ``current`` loaded, and a new context
    loads it again. While the TPM does not respond, the failure is logged and
    ``current`` is kept for the next attempt. The TpmError is raised when a
    separate process can use the key but this one cannot, because the
    provider lost its connection to the resource manager. Only a restart of
    the agent helps then, and the spool keeps the telemetry until it runs.
    """
    try:
        return create_client_context(broker, identity)
    except TpmError as exc:
        if exc.cause == PROVIDER_FAILED:
            raise
        logger.warning("TPM check before the next connection attempt failed (%s): %s", exc.cause, exc)
        return current


def _check_process_setup(identity: "Credential") -> None:
    setup = process_setup()
    if setup.problem is not None:
        raise setup.problem
    if setup.applied and setup.tcti == identity.tpm_tcti:
        return
    source = setup.config_path or "the configuration file"
    raise TpmError(
        NOT_CONFIGURED,
        f"{source}: OpenSSL in this process was started without the TPM provider for TCTI "
        f"'{identity.tpm_tcti}', because the agent reads identity.key_source and identity.tpm_tcti from this "
        "file only at start-up; set both in this file (not only in the firmware profile) and restart the agent",
        str(source),
    )


# --- the status report ----------------------------------------------------------


@dataclass(frozen=True)
class TpmStatus:
    """Whether the device key is TPM-held and, if so, whether the TPM responds and signs with it.

    ``responding``, ``key_loaded`` and ``key_matches_certificate`` are None
    when the step was not reached (or, for a key in a file, does not apply).
    ``cause`` is one of the cause constants of ``edge_agent.tpm_provider``
    and ``message`` the one-line explanation with its fix.
    """

    key_source: str
    key_path: Path
    tcti: Optional[str] = None
    resource_manager: Optional[str] = None
    responding: Optional[bool] = None
    key_loaded: Optional[bool] = None
    key_matches_certificate: Optional[bool] = None
    cause: Optional[str] = None
    message: Optional[str] = None
    elapsed_s: float = 0.0

    @property
    def tpm_held(self) -> bool:
        return self.key_source == "tpm"

    @property
    def ok(self) -> bool:
        return self.cause is None

    def to_dict(self) -> Dict[str, Any]:
        values = asdict(self)
        values["key_path"] = str(self.key_path)
        values["tpm_held"] = self.tpm_held
        values["ok"] = self.ok
        return values

    def summary(self) -> str:
        """Return one line for a technician: where the key is held and what the TPM did."""
        if not self.tpm_held:
            return f"key in a file ({self.key_path})"
        manager = self.resource_manager or "no resource manager"
        if self.ok:
            return (
                f"TPM-held key ({self.key_path}); TPM responds through {manager} (TCTI {self.tcti}); "
                f"nonce signed and verified in {self.elapsed_s * 1000:.0f} ms"
            )
        return f"TPM-held key ({self.key_path}); TPM check failed ({self.cause}): {self.message}"


def tpm_status(settings: IdentityConfig, timeout_s: float = PROBE_TIMEOUT_S) -> TpmStatus:
    """Check the device key the way start-up does, and report the result instead of raising.

    For ``key_source = "file"`` nothing is run. For a TPM key it runs one
    provider probe and one signature, each in a child process bounded by
    ``timeout_s``. The OpenSSL of the calling process is not used, so any
    command can call it.
    """
    if settings.key_source != "tpm":
        return TpmStatus(key_source=settings.key_source, key_path=settings.key)

    start = time.monotonic()
    tcti = settings.tpm_tcti
    report: Dict[str, Any] = {"key_source": "tpm", "key_path": settings.key, "tcti": tcti,
                              "resource_manager": resource_manager(tcti)}
    try:
        _status_steps(settings, timeout_s, report)
    except IdentityError as exc:
        report["cause"] = getattr(exc, "cause", None) or exc.check or "identity"
        report["message"] = str(exc)
    report["elapsed_s"] = time.monotonic() - start
    return TpmStatus(**report)


def _status_steps(settings: IdentityConfig, timeout_s: float, report: Dict[str, Any]) -> None:
    problem = tcti_problem(settings.tpm_tcti)
    if problem is not None:
        raise problem
    problem = probe_provider(settings.tpm_tcti, timeout_s)
    report["responding"] = problem is None
    if problem is not None:
        raise problem

    passphrase_setting = None
    if settings.key_passphrase_file is not None or settings.key_passphrase_credential is not None:
        passphrase_setting = "identity.key_passphrase_file or identity.key_passphrase_credential"
    check_tpm_key_file(settings.key, passphrase_setting)
    certificate = load_certificates(settings.cert, "device certificate")[0]
    try:
        sign_and_verify_nonce(settings.cert, settings.key, settings.tpm_tcti, certificate, timeout_s)
    except TpmError as exc:
        report["key_loaded"] = exc.cause == WRONG_CERTIFICATE
        report["key_matches_certificate"] = False if exc.cause == WRONG_CERTIFICATE else None
        raise
    report["key_loaded"] = True
    report["key_matches_certificate"] = True
