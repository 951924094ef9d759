"""Reading pins out of certificate, key and CSR files for ``edge-agent pin``."""

from pathlib import Path
from typing import Iterable, Iterator, List, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge_agent.errors import EdgeAgentError
from edge_agent.pinning import Pin, pin_from_public_key


def _pem_blocks(data: bytes) -> Iterator[Tuple[str, bytes]]:
    start = 0
    while True:
        begin = data.find(b"-----BEGIN ", start)
        if begin < 0:
            return
        label_end = data.find(b"-----", begin + 11)
        label = data[begin + 11:label_end].decode("ascii", "replace")
        end_marker = b"-----END " + label.encode("ascii", "replace") + b"-----"
        end = data.find(end_marker, label_end)
        if end < 0:
            raise ValueError(f"PEM block '{label}' has no END line")
        yield label, data[begin:end + len(end_marker)]
        start = end + len(end_marker)


def pins_in_file(path: Path) -> List[Tuple[str, Pin]]:
    """Return (description, pin) for every certificate, key or CSR in ``path``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EdgeAgentError(f"{path}: cannot read: {exc.strerror}") from None

    try:
        if b"-----BEGIN " in data:
            return [_pin_of_pem(label, block) for label, block in _pem_blocks(data)]
        return [_pin_of_der(data)]
    except (ValueError, TypeError) as exc:
        raise EdgeAgentError(f"{path}: not a certificate, public key, private key or CSR in PEM or DER: {exc}") from None


def _pin_of_pem(label: str, block: bytes) -> Tuple[str, Pin]:
    if label in ("CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE"):
        cert = x509.load_pem_x509_certificate(block)
        return f"certificate {cert.subject.rfc4514_string()}", pin_from_public_key(cert.public_key())
    if label in ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"):
        csr = x509.load_pem_x509_csr(block)
        return f"CSR {csr.subject.rfc4514_string()}", pin_from_public_key(csr.public_key())
    if label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
        return "public key", pin_from_public_key(serialization.load_pem_public_key(block))
    if label.endswith("PRIVATE KEY"):
        if label == "ENCRYPTED PRIVATE KEY":
            raise ValueError("the private key is encrypted; pin its certificate or public key instead")
        key = serialization.load_pem_private_key(block, password=None)
        return "private key (pin of its public half)", pin_from_public_key(key.public_key())
    raise ValueError(f"unsupported PEM block '{label}'")


def _pin_of_der(data: bytes) -> Tuple[str, Pin]:
    loaders = (
        ("certificate", lambda d: x509.load_der_x509_certificate(d).public_key()),
        ("CSR", lambda d: x509.load_der_x509_csr(d).public_key()),
        ("public key", serialization.load_der_public_key),
        ("private key (pin of its public half)", lambda d: serialization.load_der_private_key(d, None).public_key()),
    )
    for description, load in loaders:
        try:
            return description, pin_from_public_key(load(data))
        except (ValueError, TypeError):
            continue
    raise ValueError("no DER certificate, CSR, public key or unencrypted private key found")


def describe_pins(paths: Iterable[Path]) -> List[str]:
    lines = []
    for path in paths:
        for description, pin in pins_in_file(path):
            lines.append(f"{pin}  {path}: {description}")
    return lines
