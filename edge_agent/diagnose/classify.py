"""Connection failures sorted into the classes a field technician acts on, each with its remedy.

A class names what went wrong in the terms of the job at hand (the broker's
chain is not trusted, nothing listens on the port, the broker rejected the
device certificate), not in OpenSSL's words. The OpenSSL reason stays
available as the detail of the finding.
"""

import errno
import socket
import ssl
from dataclasses import dataclass
from typing import Optional

from edge_agent.pinning import PinMismatchError


@dataclass(frozen=True)
class FailureClass:
    """One kind of failure: a stable id, a one-line summary and what to do about it."""

    id: str
    summary: str
    remedy: str


DNS_FAILURE = FailureClass(
    "dns-failure",
    "the broker host name does not resolve",
    "Check the spelling of broker.host and the DNS servers in /etc/resolv.conf. "
    "Without DNS, set broker.host to the broker's IP address and broker.server_name to the name in its certificate.",
)
UNREACHABLE = FailureClass(
    "unreachable",
    "no route to the broker",
    "The gateway has no route to this address: check the uplink interface, its address and the default route "
    "('ip addr', 'ip route'), or the cellular APN.",
)
CONNECTION_REFUSED = FailureClass(
    "connection-refused",
    "the broker host refused the TCP connection",
    "Nothing accepts connections on this port: check broker.port (MQTT over TLS is usually 8883), that the broker "
    "is running, and firewalls that reject the port.",
)
TIMED_OUT = FailureClass(
    "timed-out",
    "no answer in time",
    "Packets are lost or dropped on the way: check the uplink (cable, signal, APN) and firewalls that drop the port. "
    "On a slow link, retry with a longer --timeout.",
)
RESET = FailureClass(
    "reset-during-handshake",
    "the connection was reset during the TLS handshake",
    "Something cut the connection before TLS was set up: check that the port serves MQTT over TLS (not plain MQTT "
    "on 1883) and whether a firewall or proxy on the uplink resets TLS connections.",
)
NOT_TLS = FailureClass(
    "not-tls",
    "the server on this port does not speak TLS",
    "The port answered with something other than TLS (plain MQTT or HTTP?): set broker.port to the broker's "
    "MQTT-over-TLS port, usually 8883.",
)
TLS_VERSION = FailureClass(
    "tls-version-mismatch",
    "the broker and the agent share no TLS version",
    "The agent accepts TLS 1.2 or newer (broker.tls_min_version). The broker must offer TLS 1.2 or 1.3: ask the "
    "cloud team to enable it. Never lower the floor below TLS 1.2.",
)
HANDSHAKE_FAILURE = FailureClass(
    "handshake-failure",
    "the broker aborted the TLS handshake",
    "The broker found no cipher suite or key exchange group in common with the agent, or it requires a client "
    "certificate that was not presented: check the identity checks above and the broker's TLS settings.",
)
UNTRUSTED_CHAIN = FailureClass(
    "untrusted-chain",
    "the broker's certificate chain does not lead to the configured CA",
    "Check that broker.ca_file contains the CA that issued the broker certificate (the cloud team can confirm). "
    "A TLS-inspecting proxy on the uplink also causes this: the connection must bypass it.",
)
HOSTNAME_MISMATCH = FailureClass(
    "hostname-mismatch",
    "the broker certificate is not issued for the name the agent expects",
    "Set broker.server_name (or broker.host) to a name listed in the broker certificate's subjectAltName, "
    "or ask the cloud team for a certificate that names this host.",
)
CERT_EXPIRED = FailureClass(
    "cert-expired",
    "a certificate of the broker's chain has expired",
    "Ask the cloud team to renew the broker certificate.",
)
CERT_NOT_YET_VALID = FailureClass(
    "cert-not-yet-valid",
    "a certificate of the broker's chain is not valid yet",
    "Check the gateway's clock first ('timedatectl status'). If the clock is right, the broker certificate was "
    "issued with a start date in the future: ask the cloud team.",
)
PIN_MISMATCH = FailureClass(
    "pin-mismatch",
    "no configured pin matches the broker's verified chain",
    "If the cloud team rotated the broker key, add the new key's pin (from 'edge-agent pin FILE') to broker.pins. "
    "Otherwise the uplink may be intercepted: do not remove pins to make the error go away.",
)
CLIENT_CERT_REJECTED = FailureClass(
    "client-cert-rejected",
    "the broker rejected the device certificate",
    "The broker does not trust this IDevID: ask the cloud team to add the manufacturer CA that issued it to the "
    "broker's client CA list, and check that identity.cert is the gateway's own certificate.",
)
IDENTITY_REJECTED = FailureClass(
    "identity-rejected",
    "the broker accepted TLS but rejected the device's MQTT identity",
    "The broker refused CONNECT for this client id or certificate identity: ask the cloud team to register the "
    "device id shown above (ACL or policy), or set device_id to the id the cloud expects.",
)
TLS_FAILURE = FailureClass(
    "tls-failure",
    "the TLS connection failed",
    "Read the OpenSSL reason in the finding; check broker.ca_file, broker.port and the uplink.",
)

_VERIFY_CODE_CLASSES = {
    9: CERT_NOT_YET_VALID,   # X509_V_ERR_CERT_NOT_YET_VALID
    10: CERT_EXPIRED,        # X509_V_ERR_CERT_HAS_EXPIRED
    62: HOSTNAME_MISMATCH,   # X509_V_ERR_HOSTNAME_MISMATCH
    63: HOSTNAME_MISMATCH,   # X509_V_ERR_EMAIL_MISMATCH
    64: HOSTNAME_MISMATCH,   # X509_V_ERR_IP_ADDRESS_MISMATCH
}

# OpenSSL reason codes of alerts that a server sends about the client certificate.
_CLIENT_CERT_ALERTS = (
    "CERTIFICATE_REQUIRED",
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_EXPIRED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)
_VERSION_REASONS = ("UNSUPPORTED_PROTOCOL", "PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE", "VERSION_TOO_LOW")
_NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE")
_UNREACHABLE_ERRNOS = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN)


def classify_connect_error(exc: BaseException) -> FailureClass:
    """Classify an error of the TCP connect step."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TIMED_OUT
    if isinstance(exc, ConnectionRefusedError):
        return CONNECTION_REFUSED
    if isinstance(exc, socket.gaierror):
        return DNS_FAILURE
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS:
        return UNREACHABLE
    if isinstance(exc, ConnectionResetError):
        return RESET
    return TLS_FAILURE if isinstance(exc, ssl.SSLError) else UNREACHABLE


def classify_tls_error(exc: BaseException) -> FailureClass:
    """Classify an error raised by the TLS handshake, the pin check or the first read after them."""
    if isinstance(exc, PinMismatchError):
        return PIN_MISMATCH
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODE_CLASSES.get(exc.verify_code, UNTRUSTED_CHAIN)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TIMED_OUT
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return RESET
    if isinstance(exc, ssl.SSLError):
        return _classify_ssl_reason(exc.reason or "")
    if isinstance(exc, OSError):
        return classify_connect_error(exc)
    return TLS_FAILURE


def _classify_ssl_reason(reason: str) -> FailureClass:
    if "ALERT" in reason and any(alert in reason for alert in _CLIENT_CERT_ALERTS):
        return CLIENT_CERT_REJECTED
    if any(marker in reason for marker in _VERSION_REASONS):
        return TLS_VERSION
    if any(marker in reason for marker in _NOT_TLS_REASONS):
        return NOT_TLS
    if "UNEXPECTED_EOF" in reason:
        return RESET
    if "HANDSHAKE_FAILURE" in reason:
        return HANDSHAKE_FAILURE
    return TLS_FAILURE


def describe_error(exc: BaseException) -> str:
    """Return the concrete reason of an error in one line, e.g. OpenSSL's verify message."""
    if isinstance(exc, PinMismatchError):
        return "no certificate of the verified chain matches a configured pin"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"OpenSSL {exc.reason}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text or type(exc).__name__


MQTT_VERSION = FailureClass(
    "mqtt-version",
    "the broker does not accept this MQTT protocol version",
    "Set broker.mqtt_version to a version the broker supports (\"3.1.1\" or \"5\").",
)
BROKER_UNAVAILABLE = FailureClass(
    "broker-unavailable",
    "the broker is up but does not take clients now",
    "The broker reported that it is unavailable or busy: retry later and tell the cloud team if it persists.",
)

# CONNACK reason codes as paho reports them (MQTT 5 numbering; paho maps 3.1.1 return codes onto it).
_CONNACK_CLASSES = {
    0x84: MQTT_VERSION,        # unsupported protocol version (3.1.1: 1)
    0x88: BROKER_UNAVAILABLE,  # server unavailable (3.1.1: 3)
    0x89: BROKER_UNAVAILABLE,  # server busy
}


def classify_connack(reason_code: Optional[int]) -> FailureClass:
    """Classify a refused CONNECT; ``None`` means the broker closed the connection without a CONNACK."""
    if reason_code is None:
        return CLIENT_CERT_REJECTED
    return _CONNACK_CLASSES.get(reason_code, IDENTITY_REJECTED)
