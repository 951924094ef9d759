"""Classification of failed TCP connects and TLS handshakes to the broker.

``classify_tls_error`` maps the exception of a failed connection attempt to
one short, stable class name, so that logs, telemetry and ``edge-agent``
commands can state *why* a broker was rejected without parsing OpenSSL's text.
"""

import socket
import ssl
from typing import Dict

from edge_agent.pinning import PinMismatchError

PIN_MISMATCH = "pin-mismatch"
UNTRUSTED_CHAIN = "untrusted-chain"
HOSTNAME_MISMATCH = "hostname-mismatch"
EXPIRED = "expired"
NOT_YET_VALID = "not-yet-valid"
CERTIFICATE_INVALID = "certificate-invalid"
TLS_VERSION = "tls-version"
NOT_TLS = "not-tls"
CLIENT_CERTIFICATE_REJECTED = "client-certificate-rejected"
HANDSHAKE_FAILURE = "handshake-failure"
RESET = "reset"
CLOSED = "closed"
TIMEOUT = "timeout"
REFUSED = "refused"
DNS = "dns"
NETWORK = "network"
UNKNOWN = "unknown"

# The classes in which the broker's chain was received and rejected by verification.
CERTIFICATE_CLASSES = frozenset({UNTRUSTED_CHAIN, HOSTNAME_MISMATCH, EXPIRED, NOT_YET_VALID, CERTIFICATE_INVALID})

# One hint per class, for logs and reports: its meaning and what to check first.
TLS_FAILURE_HINTS: Dict[str, str] = {
    PIN_MISMATCH: "the verified chain matches no configured pin; compare broker.pins with 'edge-agent pin --connect'",
    UNTRUSTED_CHAIN: "the broker certificate does not chain to broker.ca_file; check ca_file and the broker's chain",
    HOSTNAME_MISMATCH: "the broker certificate is not issued for the name checked; set broker.server_name to a name in it",
    EXPIRED: "a certificate of the broker chain has expired, or the gateway clock is ahead; check both",
    NOT_YET_VALID: "a broker certificate is not valid yet, or the gateway clock is behind (no RTC?); check the clock",
    CERTIFICATE_INVALID: "the broker certificate was rejected for another reason (purpose, extensions, revocation)",
    TLS_VERSION: "the broker offers no TLS version the agent accepts (TLS 1.2 or newer, see broker.tls_min_version)",
    NOT_TLS: "the port did not answer with TLS; check broker.port (8883 is MQTT over TLS, 1883 is plain MQTT)",
    CLIENT_CERTIFICATE_REJECTED: "the broker rejected the device certificate; check the broker's client CA and the IDevID",
    HANDSHAKE_FAILURE: "the TLS handshake failed (no common cipher, group or signature algorithm?)",
    RESET: "the connection was reset during the handshake (firewall, load balancer or broker overload)",
    CLOSED: "the broker closed the connection during the handshake without a TLS alert",
    TIMEOUT: "no answer in time; check the network path and broker.handshake_timeout_s",
    REFUSED: "nothing listens on broker.host and broker.port",
    DNS: "broker.host does not resolve",
    NETWORK: "the network path to the broker failed (route, interface or address)",
    UNKNOWN: "an unexpected error; run with --log-level debug and report it",
}

# OpenSSL X509_V_ERR_* codes, from include/openssl/x509_vfy.h (OpenSSL 1.1 and 3.x).
_VERIFY_CODE_CLASSES: Dict[int, str] = {
    2: UNTRUSTED_CHAIN,  # unable to get issuer certificate
    7: UNTRUSTED_CHAIN,  # certificate signature failure
    9: NOT_YET_VALID,
    10: EXPIRED,
    18: UNTRUSTED_CHAIN,  # self-signed leaf
    19: UNTRUSTED_CHAIN,  # self-signed certificate in chain
    20: UNTRUSTED_CHAIN,  # unable to get local issuer certificate
    21: UNTRUSTED_CHAIN,  # unable to verify the first certificate
    24: UNTRUSTED_CHAIN,  # invalid CA certificate
    25: UNTRUSTED_CHAIN,  # path length constraint exceeded
    27: UNTRUSTED_CHAIN,  # certificate not trusted
    28: UNTRUSTED_CHAIN,  # certificate rejected
    62: HOSTNAME_MISMATCH,
    64: HOSTNAME_MISMATCH,  # IP address mismatch
}

# OpenSSL reason codes (``SSLError.reason``) that identify a class.
_REASON_CLASSES: Dict[str, str] = {
    "UNSUPPORTED_PROTOCOL": TLS_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": TLS_VERSION,
    "WRONG_SSL_VERSION": TLS_VERSION,
    "VERSION_TOO_LOW": TLS_VERSION,
    "NO_PROTOCOLS_AVAILABLE": TLS_VERSION,
    "UNSUPPORTED_SSL_VERSION": TLS_VERSION,
    "WRONG_VERSION_NUMBER": NOT_TLS,
    "HTTP_REQUEST": NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": NOT_TLS,
    "RECORD_LENGTH_MISMATCH": NOT_TLS,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": CLIENT_CERTIFICATE_REJECTED,
    "SSLV3_ALERT_BAD_CERTIFICATE": CLIENT_CERTIFICATE_REJECTED,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": CLIENT_CERTIFICATE_REJECTED,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": CLIENT_CERTIFICATE_REJECTED,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": CLIENT_CERTIFICATE_REJECTED,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": CLIENT_CERTIFICATE_REJECTED,
    "TLSV1_ALERT_UNKNOWN_CA": CLIENT_CERTIFICATE_REJECTED,
    "TLSV1_ALERT_ACCESS_DENIED": CLIENT_CERTIFICATE_REJECTED,
    "UNEXPECTED_EOF_WHILE_READING": CLOSED,
}


def classify_tls_error(exc: BaseException) -> str:
    """Return the class of a failed connection attempt to a TLS server.

    ``exc`` is what the TCP connect, the TLS handshake or the pin check
    raised: a ``PinMismatchError``, an ``ssl.SSLCertVerificationError``, another
    ``ssl.SSLError`` or an ``OSError``. The result is one of the module
    constants, stable across OpenSSL versions, and ``TLS_FAILURE_HINTS`` contains
    one line on what each means:

    - ``pin-mismatch``: the chain verified but no certificate of it matches a pin;
    - ``untrusted-chain``: the chain does not lead to the configured CA;
    - ``hostname-mismatch``: the certificate is not issued for the checked name;
    - ``expired`` / ``not-yet-valid``: a validity period excludes the current time;
    - ``certificate-invalid``: any other verification failure;
    - ``tls-version``: no common TLS version at or above the floor;
    - ``not-tls``: the server answered with something other than TLS;
    - ``client-certificate-rejected``: the server's alert rejects our certificate;
    - ``handshake-failure``: any other TLS error;
    - ``reset`` / ``closed``: the server reset, or closed without an alert, mid-handshake;
    - ``timeout``, ``refused``, ``dns``, ``network``: the TCP connection failed;
    - ``unknown``: anything else.

    Verification failures are checked first because they subclass ``SSLError``,
    which subclasses ``OSError``.
    """
    if isinstance(exc, PinMismatchError):
        return PIN_MISMATCH
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODE_CLASSES.get(getattr(exc, "verify_code", None), CERTIFICATE_INVALID)
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return CLOSED
    if isinstance(exc, ssl.SSLError):
        return _REASON_CLASSES.get(getattr(exc, "reason", None) or "", HANDSHAKE_FAILURE)
    return _classify_os_error(exc)


def _classify_os_error(exc: BaseException) -> str:
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return RESET
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return TIMEOUT
    if isinstance(exc, socket.gaierror):
        return DNS
    if isinstance(exc, OSError):
        return NETWORK
    return UNKNOWN


def describe_tls_error(exc: BaseException) -> str:
    """Return ``"<class>: <detail>"``, one line for a log or a report.

    The detail is OpenSSL's verification message where there is one, so a
    reader sees both the stable class and the exact cause.
    """
    failure_class = classify_tls_error(exc)
    if isinstance(exc, PinMismatchError):
        detail = str(exc)
    elif isinstance(exc, ssl.SSLCertVerificationError) and getattr(exc, "verify_message", None):
        detail = f"certificate verify failed: {exc.verify_message} (verify code {exc.verify_code})"
    else:
        detail = str(exc) or type(exc).__name__
    return f"{failure_class}: {detail}"
