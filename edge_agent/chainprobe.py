"""A TLS handshake with a broker that reports its chain and the pin result; no MQTT byte is sent.

The probe uses the agent's own client context (``create_client_context``:
TLS floor, CA file, host name check, device certificate) with the pin check
taken out of the handshake, so it can list the chain and then apply the
pin-set itself. When the chain does not verify, a second handshake without
verification and without a client certificate fetches the presented chain for
display. That chain is marked as unverified and never counts as a pin match.
"""

import datetime
import logging
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from cryptography import x509

from edge_agent.config import BrokerConfig
from edge_agent.entropy import EntropyGate
from edge_agent.errors import EdgeAgentError
from edge_agent.identity import DeviceIdentity
from edge_agent.identity_checks import has_no_expiration
from edge_agent.pinfiles import name_text
from edge_agent.pinning import Pin, PinSet, PinSetStatus, pin_from_certificate_der
from edge_agent.tls import create_client_context, presented_chain_der, verified_chain_der
from edge_agent.tlserrors import CERTIFICATE_CLASSES, classify_tls_error, describe_tls_error

logger = logging.getLogger(__name__)


def parse_host_port(text: str, default_port: Optional[int] = None) -> Tuple[str, int]:
    """Split ``host:port``, ``[v6address]:port`` or a bare host; raise ``EdgeAgentError`` with the fix."""
    value = text.strip()
    host, port_text = value, None
    if value.startswith("["):
        closing = value.find("]")
        if closing < 0:
            raise EdgeAgentError(f"invalid address {text!r}: missing ']'; write [::1]:8883")
        host, rest = value[1:closing], value[closing + 1:]
        if rest:
            if not rest.startswith(":"):
                raise EdgeAgentError(f"invalid address {text!r}; write [::1]:8883")
            port_text = rest[1:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif value.count(":") > 1:
        raise EdgeAgentError(f"invalid address {text!r}: put an IPv6 address in brackets, as in [::1]:8883")

    if not host:
        raise EdgeAgentError(f"invalid address {text!r}: the host is empty; write HOST:PORT, as in broker.example.net:8883")
    if port_text is None:
        if default_port is None:
            raise EdgeAgentError(f"invalid address {text!r}: the port is missing; write HOST:PORT, as in {host}:8883")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise EdgeAgentError(f"invalid port {port_text!r} in {text!r}; use a number from 1 to 65535")
    return host, int(port_text)


@dataclass(frozen=True)
class ChainCertificate:
    """One certificate of a probed chain.

    ``position`` is its 0-based place in what the server sent, or None for
    a trust anchor that only the local CA file supplied. ``pin_index`` is the
    index in the configured pins of the pin it matches, if any; only a match
    inside the verified chain counts.
    """

    position: Optional[int]
    in_verified_chain: bool
    subject: str
    issuer: str
    not_after: Optional[datetime.datetime]
    never_expires: bool
    pin: Pin
    pin_index: Optional[int] = None

    @property
    def counts_as_match(self) -> bool:
        return self.in_verified_chain and self.pin_index is not None

    def to_dict(self) -> dict:
        return {
            "position": self.position,
            "presented": self.position is not None,
            "in_verified_chain": self.in_verified_chain,
            "subject": self.subject,
            "issuer": self.issuer,
            "not_after": None if self.never_expires or self.not_after is None else self.not_after.isoformat(),
            "never_expires": self.never_expires,
            "pin": str(self.pin),
            "sha256_hex": self.pin.hex,
            "configured_pin_index": self.pin_index,
            "counts_as_match": self.counts_as_match,
        }


@dataclass(frozen=True)
class ProbeResult:
    """The findings of one broker probe."""

    host: str
    port: int
    server_name: str
    ca_file: Path
    tls_version: Optional[str]
    verified: bool
    failure_class: Optional[str]
    failure: Optional[str]
    certificates: Tuple[ChainCertificate, ...]
    pin_set: Optional[PinSet] = None
    pin_set_status: Optional[PinSetStatus] = None
    notes: Tuple[str, ...] = field(default=())

    @property
    def matched_pin(self) -> Optional[Pin]:
        for certificate in self.certificates:
            if certificate.counts_as_match:
                return self.pin_set.pins[certificate.pin_index]
        return None

    @property
    def pins_enforced(self) -> bool:
        return self.pin_set is not None and (self.pin_set_status is None or self.pin_set_status.enforced)

    @property
    def accepted(self) -> bool:
        """True when the agent would send MQTT to this broker: chain verified and, where pins apply, one matched."""
        if not self.verified:
            return False
        return self.matched_pin is not None or not self.pins_enforced

    @property
    def chain_rejected(self) -> bool:
        """True when the handshake reached the broker's chain and verification rejected it."""
        return self.failure_class in CERTIFICATE_CLASSES

    @property
    def verdict(self) -> str:
        if self.chain_rejected:
            return f"REJECTED: the chain did not verify ({self.failure})"
        if not self.verified:
            return f"REJECTED: the TLS handshake failed ({self.failure})"
        if self.pin_set is None:
            return "chain verified; no pin-set given (pass --config to check the configured pins)"
        matched = self.matched_pin
        if matched is not None:
            return f"ACCEPTED: broker.pins[{self.pin_set.pins.index(matched)}] {matched} matches the verified chain"
        if not self.pins_enforced:
            return "ACCEPTED WITHOUT PINS: the pin-set has expired and broker.pins_on_expiry is 'ca-only'"
        return "REJECTED: pin-mismatch: no configured pin matches a certificate of the verified chain"

    def warnings(self) -> List[str]:
        """Return the problems an operator must act on, one line each."""
        lines: List[str] = []
        if self.pin_set_status is not None and self.pin_set_status.message:
            lines.append(self.pin_set_status.message)
        for certificate in self.certificates:
            if certificate.pin_index is not None and not certificate.in_verified_chain:
                lines.append(
                    f"certificate at position {certificate.position} matches broker.pins[{certificate.pin_index}] "
                    "but is not part of the verified chain, so it does not count"
                )
        if self.pin_set is not None and self.certificates:
            live = [certificate.pin for certificate in self.certificates]
            if not self.pin_set.backup_pins(live):
                lines.append(
                    "no configured pin is a backup: every pin in broker.pins matches a certificate of the live "
                    "chain, so losing one of those keys locks every gateway out; add the pin of a spare key "
                    "('edge-agent keygen') to broker.pins"
                )
        return lines

    def to_dict(self) -> dict:
        return {
            "server": f"{self.host}:{self.port}",
            "server_name": self.server_name,
            "ca_file": str(self.ca_file),
            "tls_version": self.tls_version,
            "verified": self.verified,
            "failure_class": self.failure_class,
            "failure": self.failure,
            "certificates": [certificate.to_dict() for certificate in self.certificates],
            "pins": None if self.pin_set is None else [str(pin) for pin in self.pin_set.pins],
            "pin_set": None if self.pin_set_status is None else self.pin_set_status.to_dict(),
            "matched_pin": None if self.matched_pin is None else str(self.matched_pin),
            "accepted": self.accepted,
            "verdict": self.verdict,
            "warnings": self.warnings(),
            "notes": list(self.notes),
        }


def probe_broker(
    broker: BrokerConfig,
    identity: Optional[DeviceIdentity],
    gate: EntropyGate,
    pin_set: Optional[PinSet] = None,
) -> ProbeResult:
    """Run the entropy gate, then one verifying TLS handshake with ``broker``, and report the chain.

    With ``pin_set`` None no pins are checked (``broker.pins`` is ignored).
    Raises ``EdgeAgentError`` when the kernel random generator is not ready
    or the CA file cannot be loaded. Every connection or handshake failure is
    part of the result instead.

    NOTE: under TLS 1.3 a broker rejects the client certificate only after the
    client has finished its handshake, so that rejection is not reported here.
    """
    label = f"{broker.host}:{broker.port}"
    if not gate.wait_until_ready("chain probe", label):
        detail = gate.last_status.detail if gate.last_status else "not ready"
        raise EdgeAgentError(f"no TLS handshake with {label}: the kernel random generator is not ready ({detail})")

    try:
        context = create_client_context(broker, identity)
    except (OSError, ssl.SSLError) as exc:
        raise EdgeAgentError(f"{broker.ca_file}: cannot load the CA file: {exc}; pass a PEM CA bundle") from None
    # A plain socket: the pin-set is applied below to the reported chain, not inside the handshake.
    context.sslsocket_class = ssl.SSLSocket
    notes: List[str] = []
    tls_version = None
    failure: Optional[BaseException] = None
    verified_der: List[bytes] = []
    presented_der: List[bytes] = []

    try:
        with _handshake(context, broker) as tls:
            tls_version = tls.version()
            verified_der = verified_chain_der(tls)
            presented_der = presented_chain_der(tls)
    except OSError as exc:
        failure = exc
        logger.info("probe of %s failed: %s", label, describe_tls_error(exc))

    if isinstance(failure, ssl.SSLCertVerificationError):
        presented_der, tls_version = _fetch_unverified_chain(broker, notes)

    status = pin_set.status() if pin_set is not None else None
    return ProbeResult(
        host=broker.host,
        port=broker.port,
        server_name=broker.tls_server_name,
        ca_file=broker.ca_file,
        tls_version=tls_version,
        verified=failure is None,
        failure_class=None if failure is None else classify_tls_error(failure),
        failure=None if failure is None else describe_tls_error(failure),
        certificates=tuple(_chain_certificates(presented_der, verified_der, pin_set)),
        pin_set=pin_set,
        pin_set_status=status,
        notes=tuple(notes),
    )


class _handshake:
    """A TCP connection and completed TLS handshake, closed on exit without sending application data."""

    def __init__(self, context: ssl.SSLContext, broker: BrokerConfig) -> None:
        self._context = context
        self._broker = broker
        self._tls: Optional[ssl.SSLSocket] = None

    def __enter__(self) -> ssl.SSLSocket:
        timeout = self._broker.handshake_timeout_s
        raw = socket.create_connection((self._broker.host, self._broker.port), timeout=timeout)
        try:
            self._tls = self._context.wrap_socket(raw, server_hostname=self._broker.tls_server_name)
        except BaseException:
            raw.close()
            raise
        return self._tls

    def __exit__(self, *exc_info) -> None:
        if self._tls is not None:
            self._tls.close()


def _fetch_unverified_chain(broker: BrokerConfig, notes: List[str]) -> Tuple[List[bytes], Optional[str]]:
    """Fetch the presented chain without verification, for display after a failed verification.

    No client certificate is offered: the device identity is not shown to a
    server that failed verification.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if broker.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    # Display only: this chain is marked unverified and never matched against pins.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with _handshake(context, broker) as tls:
            return presented_chain_der(tls), tls.version()
    except OSError as exc:
        # NOTE: a TLS 1.2 broker that requires a client certificate ends this handshake
        # before the chain can be read, so the failed chain is not shown.
        notes.append(f"the presented chain could not be fetched without a client certificate: {describe_tls_error(exc)}")
        return [], None


def _chain_certificates(
    presented_der: Sequence[bytes], verified_der: Sequence[bytes], pin_set: Optional[PinSet]
) -> List[ChainCertificate]:
    listed: List[Tuple[Optional[int], bytes]] = list(enumerate(presented_der))
    # Trust anchors from the CA file complete the verified chain although the server did not send them.
    listed += [(None, der) for der in verified_der if der not in presented_der]
    return [_describe_certificate(position, der, der in verified_der, pin_set) for position, der in listed]


def _describe_certificate(
    position: Optional[int], der: bytes, in_verified: bool, pin_set: Optional[PinSet]
) -> ChainCertificate:
    pin = pin_from_certificate_der(der)
    pin_index = None
    if pin_set is not None:
        for index, configured in enumerate(pin_set.pins):
            if configured.matches(pin):
                pin_index = index
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        unreadable = f"(not readable: {exc})"
        return ChainCertificate(position, in_verified, unreadable, unreadable, None, False, pin, pin_index)
    return ChainCertificate(
        position=position,
        in_verified_chain=in_verified,
        subject=name_text(certificate),
        issuer=name_text(certificate, "issuer"),
        not_after=certificate.not_valid_after_utc,
        never_expires=has_no_expiration(certificate),
        pin=pin,
        pin_index=pin_index,
    )


def probe_settings(
    host: str,
    port: int,
    ca_file: Optional[Path],
    server_name: Optional[str] = None,
    base: Optional[BrokerConfig] = None,
) -> BrokerConfig:
    """Build the broker settings of a probe from the command line over the configured broker."""
    if ca_file is None and base is None:
        raise EdgeAgentError("no CA file to verify the broker chain against; pass --ca-file FILE or --config FILE")
    if base is None:
        return BrokerConfig(host=host, port=port, pins=(), ca_file=ca_file, server_name=server_name)
    same_host = host == base.host
    return BrokerConfig(
        host=host,
        port=port,
        pins=base.pins,
        ca_file=ca_file or base.ca_file,
        server_name=server_name or (base.server_name if same_host else None),
        pins_expire=base.pins_expire,
        pins_on_expiry=base.pins_on_expiry,
        pins_warn_days=base.pins_warn_days,
        tls_min_version=base.tls_min_version,
        handshake_timeout_s=base.handshake_timeout_s,
    )

