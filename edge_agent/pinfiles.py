"""Pins of the certificates, public keys, private keys and CSRs in PEM or DER files.

A PEM file may contain several blocks, such as a certificate bundle or a key
after its certificate, and each block with a public key yields a
``PinSource``. A DER file contains exactly one object. A private key yields
the pin of its public half, and its secret part is never kept or shown.
"""

import base64
import datetime
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from edge_agent.errors import EdgeAgentError
from edge_agent.pinning import Pin, der_element_span, pin_from_certificate_der, pin_from_public_key

CERTIFICATE = "certificate"
CSR = "CSR"
PUBLIC_KEY = "public key"
PRIVATE_KEY = "private key"

_CERTIFICATE_LABELS = ("CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE")
_CSR_LABELS = ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
_PUBLIC_KEY_LABELS = ("PUBLIC KEY", "RSA PUBLIC KEY")
# Blocks that carry no public key of their own; a file may contain them beside a key.
_SKIPPED_LABELS = ("EC PARAMETERS", "DH PARAMETERS", "X509 CRL")
_ENCRYPTED_HINT = (
    "the private key is encrypted; pin its certificate or its public key instead "
    "(openssl pkey -in KEY -pubout -out KEY.pub)"
)


@dataclass(frozen=True)
class PinSource:
    """One certificate, key or CSR found in a file, with the pin of its public key.

    ``index`` counts from 1 within the file; ``subject``, ``issuer`` and
    ``not_after`` are set for certificates (``subject`` also for CSRs).
    """

    path: Path
    index: int
    kind: str
    key_type: str
    pin: Pin
    subject: Optional[str] = None
    issuer: Optional[str] = None
    not_after: Optional[datetime.datetime] = None

    @property
    def description(self) -> str:
        """A one-line label such as ``#2 certificate: CN=broker (EC P-256)``."""
        label = f"#{self.index} {self.kind}"
        if self.kind == PRIVATE_KEY:
            label += " (pin of its public half)"
        if self.subject is not None:
            label += f": {self.subject or '(empty subject)'}"
        return f"{label} ({self.key_type})"

    def to_dict(self) -> dict:
        return {
            "file": str(self.path),
            "index": self.index,
            "kind": self.kind,
            "key_type": self.key_type,
            "subject": self.subject,
            "issuer": self.issuer,
            "not_after": None if self.not_after is None else self.not_after.isoformat(),
            "pin": str(self.pin),
            "sha256_hex": self.pin.hex,
        }


def name_text(owner, attribute: str = "subject") -> str:
    """Render the ``subject`` or ``issuer`` of a certificate or CSR as RFC 4514 text.

    ``cryptography`` warns about attribute values whose length breaks the
    X.520 bounds, such as a country name longer than two letters or an empty
    CN. Real certificates carry them and OpenSSL accepts them, so they are
    shown as they are.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return getattr(owner, attribute).rfc4514_string({NameOID.SERIAL_NUMBER: "serialNumber"})


def describe_key_type(public_key) -> str:
    """Name a public key's algorithm and size the way certificates show it: ``RSA 4096``, ``EC P-256``."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "EC P-256", "secp384r1": "EC P-384", "secp521r1": "EC P-521"}.get(
            public_key.curve.name, f"EC {public_key.curve.name}"
        )
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(public_key, dsa.DSAPublicKey):
        return f"DSA {public_key.key_size}"
    return type(public_key).__name__


def read_pin_sources(path: Path) -> List[PinSource]:
    """Return a ``PinSource`` for every certificate, key or CSR in ``path``.

    Raises ``EdgeAgentError`` naming the file when it cannot be read, contains
    nothing with a public key, or contains an encrypted private key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EdgeAgentError(f"{path}: cannot read: {exc.strerror}; check the path and its permissions") from None

    try:
        if b"-----BEGIN " in data:
            sources = _read_pem(path, data)
        else:
            sources = [_read_der(path, data)]
    except (ValueError, TypeError) as exc:
        raise EdgeAgentError(
            f"{path}: not a certificate, public key, private key or CSR in PEM or DER: {exc}"
        ) from None
    if not sources:
        raise EdgeAgentError(f"{path}: the file contains no certificate, public key, private key or CSR")
    return sources


def read_all_pin_sources(paths: Iterable[Path]) -> List[PinSource]:
    return [source for path in paths for source in read_pin_sources(path)]


def _read_pem(path: Path, data: bytes) -> List[PinSource]:
    sources = []
    for label, block in _pem_blocks(data):
        if label in _SKIPPED_LABELS:
            continue
        sources.append(_pem_source(path, len(sources) + 1, label, block))
    return sources


def _pem_blocks(data: bytes) -> Iterator[Tuple[str, bytes]]:
    start = 0
    while True:
        begin = data.find(b"-----BEGIN ", start)
        if begin < 0:
            return
        label_end = data.find(b"-----", begin + 11)
        if label_end < 0:
            raise ValueError("a PEM BEGIN line is not closed with '-----'")
        label = data[begin + 11:label_end].decode("ascii", "replace")
        end_marker = b"-----END " + label.encode("ascii", "replace") + b"-----"
        end = data.find(end_marker, label_end)
        if end < 0:
            raise ValueError(f"PEM block '{label}' has no END line")
        yield label, data[begin:end + len(end_marker)]
        start = end + len(end_marker)


def _pem_source(path: Path, index: int, label: str, block: bytes) -> PinSource:
    if label in _CERTIFICATE_LABELS:
        return _certificate_source(path, index, _pem_body(block) if label == "TRUSTED CERTIFICATE" else block)
    if label in _CSR_LABELS:
        return _csr_source(path, index, x509.load_pem_x509_csr(block))
    if label in _PUBLIC_KEY_LABELS:
        return _key_source(path, index, PUBLIC_KEY, serialization.load_pem_public_key(block))
    if label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in block:
        raise ValueError(_ENCRYPTED_HINT)
    if label.endswith("PRIVATE KEY"):
        private_key = serialization.load_pem_private_key(block, password=None)
        return _key_source(path, index, PRIVATE_KEY, private_key.public_key())
    raise ValueError(f"unsupported PEM block '{label}'")


def _pem_body(block: bytes) -> bytes:
    lines = block.decode("ascii", "replace").splitlines()
    body = "".join(line for line in lines if not line.startswith("-----") and ":" not in line)
    return base64.b64decode(body)


def _certificate_source(path: Path, index: int, encoded: bytes) -> PinSource:
    """Build the source of a PEM certificate or of the DER bytes of one (an OpenSSL trusted
    certificate carries trust settings after the DER certificate, which are cut off)."""
    if encoded.startswith(b"-----"):
        certificate = x509.load_pem_x509_certificate(encoded)
    else:
        certificate = x509.load_der_x509_certificate(_first_der_element(encoded))
    der = certificate.public_bytes(serialization.Encoding.DER)
    return PinSource(
        path,
        index,
        CERTIFICATE,
        describe_key_type(certificate.public_key()),
        pin_from_certificate_der(der),
        subject=name_text(certificate),
        issuer=name_text(certificate, "issuer"),
        not_after=certificate.not_valid_after_utc,
    )


def _first_der_element(data: bytes) -> bytes:
    if not data or data[0] != 0x30:
        raise ValueError("DER data does not start with a SEQUENCE")
    _, end = der_element_span(data, 0, len(data))
    return data[:end]


def _csr_source(path: Path, index: int, csr: x509.CertificateSigningRequest) -> PinSource:
    public_key = csr.public_key()
    return PinSource(
        path, index, CSR, describe_key_type(public_key), pin_from_public_key(public_key),
        subject=name_text(csr),
    )


def _key_source(path: Path, index: int, kind: str, public_key) -> PinSource:
    return PinSource(path, index, kind, describe_key_type(public_key), pin_from_public_key(public_key))


def _read_der(path: Path, data: bytes) -> PinSource:
    try:
        return _certificate_source(path, 1, data)
    except ValueError:
        pass
    try:
        return _csr_source(path, 1, x509.load_der_x509_csr(data))
    except ValueError:
        pass
    try:
        return _key_source(path, 1, PUBLIC_KEY, serialization.load_der_public_key(data))
    except (ValueError, TypeError):
        pass
    try:
        private_key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ValueError(_ENCRYPTED_HINT) from None
    except ValueError:
        raise ValueError("no DER certificate, CSR, public key or private key found") from None
    return _key_source(path, 1, PRIVATE_KEY, private_key.public_key())
