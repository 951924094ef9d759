"""SPKI pins in curl's ``sha256//<base64>`` form and the pin-set check.

A pin is the SHA-256 digest of a certificate's DER SubjectPublicKeyInfo. It
is the value that curl's ``--pinnedpubkey`` takes and that
``openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64``
prints. Pins are matched only against the chain that the TLS stack verified.
"""

import base64
import binascii
import datetime
import functools
import hashlib
import hmac
import logging
import re
import ssl
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge_agent.errors import PinSyntaxError

logger = logging.getLogger(__name__)

PIN_PREFIX = "sha256//"
_DIGEST_SIZE = hashlib.sha256().digest_size
_BASE64_LENGTH = 44
_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_HPKP_RE = re.compile(r'^pin-sha256\s*=\s*"([^"]*)"$')

@dataclass(frozen=True)
class Pin:
    """SHA-256 digest of a DER SubjectPublicKeyInfo."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != _DIGEST_SIZE:
            raise ValueError(f"a pin digest has {_DIGEST_SIZE} bytes, got {len(self.digest)}")

    def __str__(self) -> str:
        return PIN_PREFIX + base64.b64encode(self.digest).decode("ascii")

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def matches(self, other: "Pin") -> bool:
        return hmac.compare_digest(self.digest, other.digest)


def pin_from_spki_der(spki_der: bytes) -> Pin:
    return Pin(hashlib.sha256(spki_der).digest())


def pin_from_public_key(public_key) -> Pin:
    """Compute the pin of a ``cryptography`` public key object."""
    spki_der = public_key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return pin_from_spki_der(spki_der)


def pin_from_certificate(certificate: x509.Certificate) -> Pin:
    return pin_from_public_key(certificate.public_key())


@functools.lru_cache(maxsize=64)
def pin_from_certificate_der(certificate_der: bytes) -> Pin:
    """Compute the pin of a DER certificate.

    The cache is keyed by the complete DER bytes, so a broker that presents
    the same chain on every handshake costs one dictionary lookup per
    certificate after the first time.
    """
    return pin_from_certificate(x509.load_der_x509_certificate(certificate_der))


def parse_pin(text: str) -> Pin:
    """Parse one pin in curl's form, raising ``PinSyntaxError`` with the fix.

    Other spellings (OkHttp's ``sha256/``, HPKP's ``pin-sha256="..."``, a hex
    digest) are rejected, not converted, because a pin is a security setting
    and a guessed meaning must not slip in; the message shows the canonical
    form to write instead.
    """
    if not isinstance(text, str):
        raise PinSyntaxError(f"a pin must be a string like 'sha256//<base64>', got {type(text).__name__} {text!r}")

    value = text.strip()
    if not value:
        raise PinSyntaxError("empty pin; write 'sha256//' followed by the base64 SHA-256 of the SubjectPublicKeyInfo")

    hpkp = _HPKP_RE.match(value)
    if hpkp:
        canonical = _canonical_hint(hpkp.group(1))
        raise PinSyntaxError(f"pin {value!r} uses the HPKP header spelling; write it as {canonical!r}")

    lowered = value.lower()
    if lowered.startswith("sha1/"):
        raise PinSyntaxError(
            f"pin {value!r} is a SHA-1 pin, which is not accepted; compute a SHA-256 pin with 'edge-agent pin FILE'"
        )
    if lowered.startswith(PIN_PREFIX):
        body = value[len(PIN_PREFIX):]
        if value[: len(PIN_PREFIX)] != PIN_PREFIX:
            raise PinSyntaxError(f"pin {value!r} must start with lower-case 'sha256//'; write {PIN_PREFIX + body!r}")
        return Pin(_decode_base64_digest(body, value))
    if lowered.startswith("sha256/"):
        body = value[len("sha256/"):]
        raise PinSyntaxError(f"pin {value!r} uses OkHttp's single-slash spelling; write it as {_canonical_hint(body)!r}")
    if _HEX_RE.match(value):
        canonical = PIN_PREFIX + base64.b64encode(bytes.fromhex(value)).decode("ascii")
        raise PinSyntaxError(f"pin {value!r} is a hex digest; pins are base64, write it as {canonical!r}")
    if "//" in value:
        algorithm = value.split("//", 1)[0]
        raise PinSyntaxError(f"pin {value!r} names the algorithm {algorithm!r}; only 'sha256//' pins are accepted")

    raise PinSyntaxError(f"pin {value!r} lacks the 'sha256//' prefix; write it as {_canonical_hint(value)!r}")


def _canonical_hint(body: str) -> str:
    try:
        return str(Pin(_decode_base64_digest(body, body)))
    except PinSyntaxError:
        return PIN_PREFIX + body


def _decode_base64_digest(body: str, original: str) -> bytes:
    if "-" in body or "_" in body:
        standard = body.replace("-", "+").replace("_", "/")
        raise PinSyntaxError(
            f"pin {original!r} uses URL-safe base64 ('-' or '_'); write it in standard base64 as "
            f"{PIN_PREFIX + standard!r}"
        )
    if len(body) != _BASE64_LENGTH:
        raise PinSyntaxError(
            f"pin {original!r} has {len(body)} base64 characters after 'sha256//', expected {_BASE64_LENGTH} "
            f"(a padded SHA-256 digest ending in '='); copy it again from 'edge-agent pin FILE'"
        )
    try:
        digest = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise PinSyntaxError(
            f"pin {original!r} is not valid base64; copy it again from 'edge-agent pin FILE'"
        ) from None
    if len(digest) != _DIGEST_SIZE:
        raise PinSyntaxError(f"pin {original!r} decodes to {len(digest)} bytes, expected {_DIGEST_SIZE}")
    return digest


def parse_pin_list(pins: Union[str, Iterable[str]]) -> "tuple[Pin, ...]":
    """Parse pins given as a list or as curl's ``;``-separated string.

    An empty item, a bad pin or a duplicate raises ``PinSyntaxError``: a list
    with a dropped entry would quietly lose a backup pin.
    """
    items = pins.split(";") if isinstance(pins, str) else list(pins)
    parsed: "list[Pin]" = []
    for position, item in enumerate(items, start=1):
        if isinstance(item, str) and not item.strip():
            raise PinSyntaxError(f"pin list item {position} is empty; remove the stray ';' or add the pin")
        try:
            pin = parse_pin(item)
        except PinSyntaxError as exc:
            raise PinSyntaxError(f"pin list item {position}: {exc}") from None
        if pin in parsed:
            first = parsed.index(pin) + 1
            raise PinSyntaxError(f"pin list item {position} repeats item {first} ({pin}); remove the duplicate")
        parsed.append(pin)
    return tuple(parsed)


class PinMismatchError(ssl.SSLCertVerificationError):
    """The verified chain contains no certificate whose SPKI is in the pin-set."""

    def __init__(self, expected: Sequence[Pin], presented: Sequence[Pin], server: str = "") -> None:
        self.expected = tuple(expected)
        self.presented = tuple(presented)
        self.server = server
        expected_text = ", ".join(str(p) for p in self.expected) or "none"
        presented_text = ", ".join(str(p) for p in self.presented) or "none"
        where = f" from {server}" if server else ""
        super().__init__(
            f"pin mismatch{where}: no certificate of the verified chain matches a configured pin; "
            f"expected one of [{expected_text}], broker presented [{presented_text}]"
        )


@dataclass(frozen=True)
class PinSet:
    """The configured pins and what happens when the set expires.

    ``on_expiry`` is ``"enforce"`` (keep checking pins) or ``"ca-only"`` (after
    ``expires`` only the CA chain and host name are checked).
    """

    pins: "tuple[Pin, ...]"
    expires: Optional[datetime.date] = None
    on_expiry: str = "enforce"
    warn_days: int = 30
    _warned: "list[bool]" = field(default_factory=lambda: [False], compare=False, repr=False)

    def is_expired(self, today: Optional[datetime.date] = None) -> bool:
        if self.expires is None:
            return False
        today = today or datetime.datetime.now(datetime.timezone.utc).date()
        return today > self.expires

    def enforced(self, today: Optional[datetime.date] = None) -> bool:
        return not (self.on_expiry == "ca-only" and self.is_expired(today))

    def first_match(self, chain: Sequence[Pin]) -> Optional[Pin]:
        """Return the configured pin that matches a chain member, or None.

        Every comparison runs, so the time taken does not depend on where a
        match sits.
        """
        found: Optional[Pin] = None
        for presented in chain:
            for configured in self.pins:
                if configured.matches(presented) and found is None:
                    found = configured
        return found

    def check_chain(self, chain_der: Sequence[bytes], server: str = "") -> Optional[Pin]:
        """Raise ``PinMismatchError`` unless the verified chain matches a pin.

        An empty chain fails, because nothing was verified. Returns the pin that
        matched, or None when the expired pin-set runs in CA-only mode.
        """
        presented = [pin_from_certificate_der(der) for der in chain_der]
        if not self.enforced():
            if not self._warned[0]:
                logger.warning(
                    "pin-set expired on %s and pins.on_expiry is 'ca-only': %s accepted on CA validation alone",
                    self.expires, server or "broker",
                )
                self._warned[0] = True
            return None

        match = self.first_match(presented) if presented else None
        if match is None:
            raise PinMismatchError(self.pins, presented, server)
        return match
