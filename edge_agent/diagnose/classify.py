"""Connection failures sorted into the classes a field technician acts on, each with its remedy.

A class names what went wrong in the terms of the job at hand (the broker's
chain is not trusted, nothing listens on the port, the broker rejected the
device certificate), not in OpenSSL's words. The OpenSSL reason stays
available as the detail of the finding.
"""

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
    "the connection was reset or closed during the TLS handshake",
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
CERT_INVALID = FailureClass(
    "cert-invalid",
    "the broker certificate failed verification for another reason",
    "Read OpenSSL's verify message in the finding (purpose, extensions or a bad signature) and pass it to the "
    "cloud team with the broker certificate shown.",
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
