"""The gateway's IEEE 802.1AR identity: IDevID certificate, private key, trust anchors.

Loading checks what the TLS client certificate needs: the files parse, the
key file is private to its owner, the key matches the certificate, and the
certificate chains to a configured manufacturer trust anchor by name and
signature. Real IDevIDs break many Web-PKI rules (no authorityKeyIdentifier,
non-critical CA basicConstraints), so the chain is walked with
``verify_directly_issued_by`` and explicit checks instead of a Web-PKI
verifier.
"""

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, ed448, rsa
from cryptography.x509.oid import NameOID

from edge_agent.config import IdentityConfig, secret_file_mode_problem
from edge_agent.errors import IdentityError
from edge_agent.pinning import Pin, pin_from_certificate

logger = logging.getLogger(__name__)

# RFC 5280 4.1.2.5: this notAfter value means "no well-defined expiration".
NO_EXPIRATION = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)

_PEM_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class DeviceIdentity:
    """A loaded and checked device identity, ready to be the TLS client certificate."""

    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    chain: "tuple[x509.Certificate, ...]"
    device_id: str
    device_id_source: str
    key_passphrase: Optional[bytes] = None
    # "tpm": key_path is a TSS2 blob that only the TPM behind tpm_tcti can use.
    key_source: str = "file"
    tpm_tcti: Optional[str] = None

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @property
    def pin(self) -> Pin:
        return pin_from_certificate(self.certificate)

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def never_expires(self) -> bool:
        return has_no_expiration(self.certificate)

    def __repr__(self) -> str:
        # The passphrase must not reach logs through a repr.
        return f"DeviceIdentity(device_id={self.device_id!r}, subject={self.subject!r}, cert_path='{self.cert_path}')"


def has_no_expiration(certificate: x509.Certificate) -> bool:
    return certificate.not_valid_after_utc == NO_EXPIRATION


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{path}: {what} not found; fix identity settings in the configuration", str(path)) from None
    except PermissionError:
        raise IdentityError(f"{path}: {what} is not readable by this user; fix its owner or mode", str(path)) from None
    except IsADirectoryError:
        raise IdentityError(f"{path}: {what} is a directory, expected a file", str(path)) from None


def load_certificates(path: Path, what: str = "certificate file") -> "list[x509.Certificate]":
    """Load every certificate of a PEM bundle or one DER certificate."""
    data = read_file(path, what)
    if b"PRIVATE KEY-----" in data:
        raise IdentityError(
            f"{path}: the {what} contains a private key; keep the key in its own file with mode 0600 "
            "and set identity.key to it",
            str(path),
        )
    try:
        if _PEM_CERT_BEGIN in data:
            certificates = x509.load_pem_x509_certificates(data)
        else:
            certificates = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise IdentityError(f"{path}: cannot parse the {what} as PEM or DER X.509: {exc}", str(path)) from None
    if not certificates:
        raise IdentityError(f"{path}: the {what} contains no certificate", str(path))
    return certificates


def read_passphrase(path: Optional[Path]) -> Optional[bytes]:
    """Read a key passphrase from a file; one trailing newline is not part of it."""
    if path is None:
        return None
    problem = secret_file_mode_problem(path) if path.exists() else None
    if problem:
        raise IdentityError(problem, str(path), "key-permissions")
    data = read_file(path, "key passphrase file")
    return data[:-1] if data.endswith(b"\n") else data


def load_private_key(path: Path, passphrase: Optional[bytes] = None):
    """Load a PEM or DER private key, refusing a file that others can read."""
    problem = secret_file_mode_problem(path) if path.exists() else None
    if problem:
        raise IdentityError(problem, str(path), "key-permissions")

    data = read_file(path, "private key")
    loader = serialization.load_pem_private_key if b"-----BEGIN" in data else serialization.load_der_private_key
    try:
        return loader(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise IdentityError(
                f"{path}: the private key is encrypted and no passphrase is configured; set "
                "identity.key_passphrase_file to a file that contains the passphrase",
                str(path),
                "key-load",
            ) from None
        raise IdentityError(f"{path}: the private key is not encrypted but a passphrase is configured: {exc}", str(path), "key-load") from None
    except ValueError:
        # The cryptography message can quote the parse state; the passphrase itself never reaches it.
        hint = "the passphrase is wrong or " if passphrase is not None else ""
        raise IdentityError(
            f"{path}: cannot load the private key: {hint}the file is not a PEM or DER private key", str(path), "key-load"
        ) from None
    except UnsupportedAlgorithm as exc:
        raise IdentityError(f"{path}: unsupported private key algorithm: {exc}", str(path), "key-load") from None


def public_keys_equal(first, second) -> bool:
    encoding, fmt = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return first.public_bytes(encoding, fmt) == second.public_bytes(encoding, fmt)


def check_key_matches(certificate: x509.Certificate, private_key, cert_path: Path, key_path: Path) -> None:
    if not public_keys_equal(certificate.public_key(), private_key.public_key()):
        raise IdentityError(
            f"{key_path}: the private key does not belong to the certificate {cert_path} "
            f"(subject {certificate.subject.rfc4514_string()}); install the key that was issued with it",
            str(key_path),
            "key-match",
        )


def is_issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Check name and signature; key identifiers must agree when both are present."""
    if child.issuer != issuer.subject:
        return False
    try:
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    authority = _authority_key_id(child)
    subject = _subject_key_id(issuer)
    return authority is None or subject is None or authority == subject


def _authority_key_id(certificate: x509.Certificate) -> Optional[bytes]:
    try:
        return certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None


def _subject_key_id(certificate: x509.Certificate) -> Optional[bytes]:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def build_chain(
    leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> "list[x509.Certificate]":
    """Walk from the leaf to a trust anchor; return the path including the anchor.

    Several CAs may share a subject name with different keys, so every
    candidate is tried by signature, not just the first one with the name.
    """
    path = [leaf]
    current = leaf
    pool = list(intermediates)
    for _ in range(len(pool) + 1):
        for anchor in anchors:
            if is_issued_by(current, anchor):
                return path + [anchor]
        for candidate in pool:
            if is_issued_by(current, candidate):
                path.append(candidate)
                pool.remove(candidate)
                current = candidate
                break
        else:
            break
    raise IdentityError(
        f"the device certificate (subject {leaf.subject.rfc4514_string()}, issuer "
        f"{leaf.issuer.rfc4514_string()}) does not chain to any configured trust anchor by name and signature; "
        "add the manufacturer CA that issued it to identity.trust_anchors",
        check="chain",
    )


def extract_device_id(certificate: x509.Certificate) -> "tuple[str, str]":
    """Return the device id and where it came from: subject serialNumber, else CN."""
    for oid, source in ((NameOID.SERIAL_NUMBER, "subject serialNumber"), (NameOID.COMMON_NAME, "subject CN")):
        attributes = certificate.subject.get_attributes_for_oid(oid)
        if attributes:
            value = str(attributes[0].value).strip()
            if value:
                return value, source
    raise IdentityError(
        f"the device certificate (subject {certificate.subject.rfc4514_string()!r}) has neither a serialNumber "
        "nor a CN; set device_id in the configuration",
        check="device-id",
    )


def _check_key_type(certificate: x509.Certificate, path: Path) -> None:
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise IdentityError(f"{path}: RSA key of {key.key_size} bits is too weak; use 2048 bits or more", str(path), "key-type")
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        raise IdentityError(f"{path}: unsupported public key type {type(key).__name__}", str(path), "key-type")


def load_identity(settings: IdentityConfig, device_id: Optional[str] = None) -> DeviceIdentity:
    """Load and check the device identity that the TLS connection presents."""
    certificates = load_certificates(settings.cert, "device certificate")
    leaf, intermediates = certificates[0], certificates[1:]
    _check_key_type(leaf, settings.cert)

    passphrase = read_passphrase(settings.key_passphrase_file)
    if settings.key_source == "tpm":
        # Imported here because edge_agent.tpm imports this module. A TPM key cannot
        # be loaded here; the self-test checks it against the certificate when the
        # TLS context is built.
        from edge_agent.tpm import check_tpm_key_file

        check_tpm_key_file(settings)
    else:
        private_key = load_private_key(settings.key, passphrase)
        check_key_matches(leaf, private_key, settings.cert, settings.key)

    anchors: "list[x509.Certificate]" = []
    for anchor_path in settings.trust_anchors:
        anchors.extend(load_certificates(anchor_path, "trust anchor file"))
    build_chain(leaf, intermediates, anchors)
    _log_validity(leaf, settings.cert)

    if device_id:
        resolved_id, source = device_id, "configuration"
    else:
        resolved_id, source = extract_device_id(leaf)

    identity = DeviceIdentity(
        cert_path=settings.cert,
        key_path=settings.key,
        certificate=leaf,
        chain=tuple(intermediates),
        device_id=resolved_id,
        device_id_source=source,
        key_passphrase=passphrase,
        key_source=settings.key_source,
        tpm_tcti=settings.tpm_tcti if settings.key_source == "tpm" else None,
    )
    logger.info("loaded device identity %s (device id %s from %s)", identity.subject, resolved_id, source)
    return identity


def _log_validity(certificate: x509.Certificate, path: Path) -> None:
    if has_no_expiration(certificate):
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > certificate.not_valid_after_utc:
        logger.warning("device certificate %s expired on %s", path, certificate.not_valid_after_utc.isoformat())
    elif now < certificate.not_valid_before_utc:
        logger.warning(
            "device certificate %s is not valid before %s; the system clock may be wrong",
            path, certificate.not_valid_before_utc.isoformat(),
        )

