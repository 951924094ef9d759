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
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

from edge_agent.errors import PinSyntaxError

if TYPE_CHECKING:
    from cryptography import x509

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
        return PIN_PREFIX + self.digest_base64

    @property
    def digest_base64(self) -> str:
        return base64.b64encode(self.digest).decode("ascii")

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def matches(self, other: "Pin") -> bool:
        return hmac.compare_digest(self.digest, other.digest)


def pin_from_spki_der(spki_der: bytes) -> Pin:
    return Pin(hashlib.sha256(spki_der).digest())


def pin_from_public_key(public_key) -> Pin:
    """Compute the pin of a ``cryptography`` public key object."""
    # Imported here, so that the service, which computes pins from DER only, does not load cryptography.
    from cryptography.hazmat.primitives import serialization

    spki_der = public_key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return pin_from_spki_der(spki_der)


def pin_from_certificate(certificate: "x509.Certificate") -> Pin:
    return pin_from_public_key(certificate.public_key())


@functools.lru_cache(maxsize=64)
def pin_from_certificate_der(certificate_der: bytes) -> Pin:
    """Compute the pin of a DER certificate from the SPKI bytes it contains.

    The cache is keyed by the complete DER bytes, so a broker that presents
    the same chain on every handshake costs one dictionary lookup per
    certificate after the first time.
    """
    return pin_from_spki_der(spki_from_certificate_der(certificate_der))


def spki_from_certificate_der(certificate_der: bytes) -> bytes:
    """Return the SubjectPublicKeyInfo exactly as it is encoded in a DER certificate.

    Hashing these bytes needs no certificate parser, so a certificate that
    ``cryptography`` refuses to load (a name string that its ASN.1 type
    forbids, for example) still gets its pin; OpenSSL accepts such
    certificates in a handshake. Raises ``ValueError`` on malformed DER.
    """
    certificate = der_children(certificate_der, 0, len(certificate_der))
    if not certificate or certificate[0][0] != _DER_SEQUENCE:
        raise ValueError("not a DER certificate: no tbsCertificate SEQUENCE")
    _, _, tbs_end, tbs_start = certificate[0]
    tbs = der_children(certificate_der, tbs_start, tbs_end)
    # tbsCertificate: [0] version (optional), serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo.
    index = 6 if tbs and tbs[0][0] == _DER_VERSION_TAG else 5
    if len(tbs) <= index or tbs[index][0] != _DER_SEQUENCE:
        raise ValueError("not a DER certificate: no subjectPublicKeyInfo SEQUENCE")
    return certificate_der[tbs[index][3]:tbs[index][2]]


_DER_SEQUENCE = 0x30
_DER_VERSION_TAG = 0xA0


def der_children(data: bytes, start: int, end: int) -> "list[tuple[int, int, int, int]]":
    """Split the DER element at ``start`` into its children: (tag, content start, end, element start)."""
    content_start, content_end = der_element_span(data, start, end)
    children = []
    offset = content_start
    while offset < content_end:
        child_start, child_end = der_element_span(data, offset, content_end)
        children.append((data[offset], child_start, child_end, offset))
        offset = child_end
    return children


def der_element_span(data: bytes, offset: int, limit: int) -> "tuple[int, int]":
    """Return (content start, end) of the DER element at ``offset``; raise ``ValueError`` past ``limit``."""
    if offset + 2 > limit:
        raise ValueError("truncated DER element")
    length = data[offset + 1]
    header = 2
    if length & 0x80:
        size = length & 0x7F
        if size == 0 or size > 4 or offset + 2 + size > limit:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[offset + 2:offset + 2 + size], "big")
        header += size
    if offset + header + length > limit:
        raise ValueError("truncated DER element")
    return offset + header, offset + header + length


def parse_pin(text: str) -> Pin:
    """Parse one pin in curl's form, raising ``PinSyntaxError`` with the fix.

    Other spellings (OkHttp's ``sha256/``, HPKP's ``pin-sha256="..."``, a hex
    digest) are rejected, not converted, because a pin is a security setting
    and a guessed meaning must not slip in. The message shows the canonical
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
    if any(ch.isspace() for ch in value):
        first = value.split()[0]
        raise PinSyntaxError(
            f"pin {value!r} contains spaces or text after the pin; keep only the 'sha256//...' part ({first!r})"
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
    from_string = isinstance(pins, str)
    items = pins.split(";") if from_string else list(pins)
    parsed: "list[Pin]" = []
    for position, item in enumerate(items, start=1):
        if isinstance(item, str) and not item.strip():
            fix = "remove the stray ';'" if from_string else "remove the empty string"
            raise PinSyntaxError(f"pin list item {position} is empty; {fix} or add the pin")
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

    def __str__(self) -> str:
        # SSLError's own __str__ shows the args tuple when there is no errno.
        return self.args[0]


# Pin-set states by expiry date, as ``PinSet.status`` reports them.
NO_EXPIRY = "no-expiry"
VALID = "valid"
EXPIRING = "expiring"
EXPIRED = "expired"

# Rate limits for the repeated expiry messages of one pin-set, in seconds.
_EXPIRING_LOG_INTERVAL_S = 24 * 3600.0
_EXPIRED_LOG_INTERVAL_S = 3600.0


def _days(count: int) -> str:
    return "1 day" if count == 1 else f"{count} days"


def utc_today() -> datetime.date:
    return datetime.datetime.now(datetime.timezone.utc).date()


@dataclass(frozen=True)
class PinSetStatus:
    """The state of a pin-set against its expiry date on one day.

    ``days_left`` is negative once the set has expired and None without an
    expiry date; ``message`` is empty while no warning is due.
    """

    state: str
    expires: Optional[datetime.date]
    days_left: Optional[int]
    enforced: bool
    message: str

    def to_dict(self) -> dict:
        return {
            "state": self.state,
            "expires": None if self.expires is None else self.expires.isoformat(),
            "days_left": self.days_left,
            "enforced": self.enforced,
            "message": self.message,
        }


# The status of every pin-set without an expiry date, built once because every handshake reads it.
_NO_EXPIRY_STATUS = PinSetStatus(NO_EXPIRY, None, None, True, "")


class _RateLimit:
    """Monotonic timestamps of the last expiry messages of one pin-set."""

    def __init__(self) -> None:
        self._last: "dict[str, float]" = {}

    def due(self, key: str, interval_s: float) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < interval_s:
            return False
        self._last[key] = now
        return True


@dataclass(frozen=True)
class PinSet:
    """The configured pins and what happens when the set expires.

    Like Android's ``<pin-set expiration>``, the set is valid through the day
    ``expires`` (UTC) and expired from the next day on. ``on_expiry`` is
    ``"enforce"`` (keep checking pins, the default) or ``"ca-only"`` (after
    ``expires`` only the CA chain and host name are checked, with a warning on
    every handshake). Warnings start ``warn_days`` days before ``expires``.
    """

    pins: "tuple[Pin, ...]"
    expires: Optional[datetime.date] = None
    on_expiry: str = "enforce"
    warn_days: int = 30
    _log_limit: _RateLimit = field(default_factory=_RateLimit, compare=False, repr=False)

    def is_expired(self, today: Optional[datetime.date] = None) -> bool:
        if self.expires is None:
            return False
        return (today or utc_today()) > self.expires

    def enforced(self, today: Optional[datetime.date] = None) -> bool:
        return not (self.on_expiry == "ca-only" and self.is_expired(today))

    def status(self, today: Optional[datetime.date] = None) -> PinSetStatus:
        """Report the expiry state on ``today`` (default: the current UTC date)."""
        if self.expires is None:
            return _NO_EXPIRY_STATUS

        today = today or utc_today()
        days_left = (self.expires - today).days
        enforced = self.enforced(today)
        if days_left < 0:
            return PinSetStatus(EXPIRED, self.expires, days_left, enforced, self._expired_message(-days_left, enforced))
        if days_left <= self.warn_days:
            return PinSetStatus(EXPIRING, self.expires, days_left, True, self._expiring_message(days_left))
        return PinSetStatus(VALID, self.expires, days_left, True, "")

    def _expiring_message(self, days_left: int) -> str:
        when = "today" if days_left == 0 else f"in {_days(days_left)}"
        after = (
            "the agent keeps enforcing these pins (broker.pins_on_expiry = 'enforce')"
            if self.on_expiry == "enforce"
            else "the agent stops checking pins and trusts CA validation alone (broker.pins_on_expiry = 'ca-only')"
        )
        return (
            f"pin-set expires on {self.expires.isoformat()}, {when}; after that day {after}; "
            "roll out the new pins with a later broker.pins_expire before then"
        )

    def _expired_message(self, days_ago: int, enforced: bool) -> str:
        if enforced:
            return (
                f"pin-set expired on {self.expires.isoformat()} ({_days(days_ago)} ago) and pins are still enforced "
                "(broker.pins_on_expiry = 'enforce'); review broker.pins and set a later broker.pins_expire"
            )
        return (
            f"pin-set expired on {self.expires.isoformat()} ({_days(days_ago)} ago) and broker.pins_on_expiry = 'ca-only': "
            "pins are NOT checked and any broker certificate that chains to broker.ca_file is accepted; "
            "set new broker.pins and a later broker.pins_expire to restore pinning"
        )

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

    def backup_pins(self, live_chain: Sequence[Pin]) -> "tuple[Pin, ...]":
        """Return the configured pins that match no certificate of ``live_chain``.

        These are the backups: they keep gateways connected when the broker
        moves to a key outside the live chain. When none is left, losing one
        key of the live chain locks every gateway out.
        """
        return tuple(pin for pin in self.pins if not any(pin.matches(live) for live in live_chain))

    def check_chain(
        self, chain_der: Sequence[bytes], server: str = "", today: Optional[datetime.date] = None
    ) -> Optional[Pin]:
        """Raise ``PinMismatchError`` unless the verified chain matches a pin.

        An empty chain fails, because nothing was verified. Returns the pin that
        matched, or None when the expired pin-set runs in CA-only mode.
        """
        presented = [pin_from_certificate_der(der) for der in chain_der]
        status = self.status(today)
        self._log_expiry(status, server)
        if not status.enforced:
            # Logged on every handshake, so that running without pins never goes unnoticed.
            logger.warning(
                "pin check skipped for %s: %s; the broker presented [%s]",
                server or "broker", status.message, ", ".join(map(str, presented)) or "none",
            )
            return None

        match = self.first_match(presented) if presented else None
        if match is None:
            raise PinMismatchError(self.pins, presented, server)
        return match

    def _log_expiry(self, status: PinSetStatus, server: str) -> None:
        if status.state == EXPIRING and self._log_limit.due(EXPIRING, _EXPIRING_LOG_INTERVAL_S):
            logger.warning("%s: %s", server or "broker", status.message)
        elif status.state == EXPIRED and status.enforced and self._log_limit.due(EXPIRED, _EXPIRED_LOG_INTERVAL_S):
            logger.error("%s: %s", server or "broker", status.message)
