"""Broker keys, certificates and servers for the pin tests.

``BrokerKeys`` contains one broker CA with its key in memory and three broker
keys: ``live`` (pinned, in use), ``spare`` (pinned, the backup) and
``other`` (never pinned), so a test can issue any certificate it needs.
"""

import datetime
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from edge_agent.devbroker import DevBroker
from edge_agent.devpki import Issued, issue_server_cert, make_ca, new_key, write_certificates, write_private_key
from edge_agent.keys import san_entry
from edge_agent.pinning import Pin, pin_from_public_key

UTC = datetime.timezone.utc

# Python 3.9's ssl module returns the broker's leaf only; 3.10 added get_verified_chain.
needs_verified_chain = pytest.mark.skipif(
    not hasattr(ssl._ssl._SSLSocket, "get_verified_chain"),
    reason="this Python's ssl module exposes only the leaf certificate, not the verified chain",
)


@dataclass
class BrokerKeys:
    """A broker CA and the live, spare and unpinned broker keys."""

    folder: Path
    ca: Issued
    ca_file: Path
    live: object
    spare: object
    other: object

    @property
    def live_pin(self) -> Pin:
        return pin_from_public_key(self.live.public_key())

    @property
    def spare_pin(self) -> Pin:
        return pin_from_public_key(self.spare.public_key())

    @property
    def other_pin(self) -> Pin:
        return pin_from_public_key(self.other.public_key())

    @property
    def pins(self) -> List[str]:
        return [str(self.live_pin), str(self.spare_pin)]

    def issue(self, key, names: Sequence[str] = ("localhost", "127.0.0.1"), **validity) -> x509.Certificate:
        return issue_server_cert(self.ca, names, key=key, **validity).certificate

    def write_server(self, name: str, key, certificates: Sequence[x509.Certificate]) -> "tuple[Path, Path]":
        """Write a certificate file (leaf first, then any extra certificates) and its key under ``name``."""
        folder = self.folder / name
        folder.mkdir(exist_ok=True)
        cert_path = write_certificates(folder / "broker.pem", certificates)
        key_path = folder / "broker.key"
        if not key_path.exists():
            write_private_key(key_path, key)
        return cert_path, key_path


def create_broker_keys(folder: Path) -> BrokerKeys:
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca("pin test broker CA")
    ca_file = write_certificates(folder / "broker-ca.pem", [ca.certificate])
    return BrokerKeys(folder, ca, ca_file, new_key(), new_key(), new_key())


def self_signed(key, names: Sequence[str] = ("localhost", "127.0.0.1")) -> x509.Certificate:
    """A self-signed server certificate for ``names`` with no CA behind it."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([san_entry(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )


def start_broker(keys: BrokerKeys, name: str, key, certificates, client_ca: Path) -> DevBroker:
    cert_path, key_path = keys.write_server(name, key, certificates)
    return DevBroker(keys.folder / name / "mosquitto", cert_path, key_path, client_ca).start()


def wait_for_text(read, text: str, timeout_s: float = 15.0) -> str:
    """Poll ``read()`` until it contains ``text`` or the timeout passes; return the last value."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while text not in value and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


def connection_lines(log: str) -> List[str]:
    """Return the Mosquitto log lines of incoming connections.

    "New connection from" follows a completed TLS handshake; "Client
    connection from ... failed" is a handshake that failed. The readiness
    probe of ``DevBroker.start`` leaves one line of the second kind.
    """
    return [line for line in log.splitlines() if "New connection from" in line or "Client connection from" in line]


def wait_for_connections(read: Callable[[], str], count: int = 2, timeout_s: float = 15.0) -> str:
    """Poll the broker log from ``read()`` until it shows ``count`` connections; return it."""
    deadline = time.monotonic() + timeout_s
    log = read()
    while len(connection_lines(log)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        log = read()
    return log


def refused_before_mqtt(log: str, count: int = 2) -> bool:
    """True when a Mosquitto log shows ``count`` connections but no MQTT packet from any client."""
    no_packet = "CONNECT" not in log.replace("DISCONNECT", "") and "Received" not in log
    return len(connection_lines(log)) >= count and no_packet


class ResetServer:
    """A TCP server that reads the ClientHello, then resets the connection (SO_LINGER 0)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen()
        self._listener.settimeout(30)
        self.port = self._listener.getsockname()[1]
        self.received: List[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(10)
            try:
                self.received.append(connection.recv(65536))
            except OSError:
                pass
            # l_onoff=1, l_linger=0: close() sends RST instead of FIN.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=10)


def tls_record_types(data: Optional[bytes]) -> List[int]:
    """Return the content types of the TLS records in ``data`` (22 handshake, 23 application data)."""
    types = []
    offset = 0
    while data and offset + 5 <= len(data):
        types.append(data[offset])
        offset += 5 + int.from_bytes(data[offset + 3:offset + 5], "big")
    return types
