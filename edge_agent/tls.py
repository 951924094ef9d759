"""The client TLS context: TLS 1.2 or newer, CA and host name checks, then the SPKI pin check.

The pin check runs inside ``do_handshake`` of an ``ssl.SSLSocket`` subclass.
paho-mqtt wraps its socket with ``do_handshake_on_connect=False``, calls
``do_handshake()`` and only then writes CONNECT, so a broker whose verified
chain matches no pin is disconnected before it receives a single MQTT byte.
"""

import base64
import logging
import os
import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Union

from edge_agent.config import BrokerConfig
from edge_agent.errors import ConfigError, IdentityError
from edge_agent.pinning import PinMismatchError, PinSet, der_children, der_element_span

if TYPE_CHECKING:
    from edge_agent.credential import ClientCredential
    from edge_agent.identity import DeviceIdentity

    # Both carry the key location, the PEM chain and how the key is held.
    Credential = Union[ClientCredential, DeviceIdentity]

logger = logging.getLogger(__name__)

_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def verified_chain_der(sock: ssl.SSLSocket) -> List[bytes]:
    """Return the DER certificates of the chain that OpenSSL verified, leaf first.

    Python 3.13 makes ``get_verified_chain`` public; 3.10 to 3.12 have it on
    the private ``_sslobj``; 3.9 has only the leaf. A resumed session returns
    an empty chain, so the caller falls back to the verified leaf and an empty
    result can never pass the pin check.
    """
    chain = _chain_der(sock, "get_verified_chain") or []
    if not chain:
        leaf = sock.getpeercert(binary_form=True)
        if leaf:
            chain = [leaf]
    return chain


def presented_chain_der(sock: ssl.SSLSocket) -> List[bytes]:
    """Return the DER certificates the peer sent, in its order, verified or not.

    For display only: pins are never matched against this list, because a
    peer may append any certificate it likes. Python 3.9 returns the leaf alone.
    """
    chain = _chain_der(sock, "get_unverified_chain")
    if chain is None:
        leaf = sock.getpeercert(binary_form=True)
        return [leaf] if leaf else []
    return chain


def _chain_der(sock: ssl.SSLSocket, method: str) -> Optional[List[bytes]]:
    """Call ``method`` where this Python has it, or return None on 3.9."""
    getter = getattr(sock, method, None)
    if getter is None:
        getter = getattr(getattr(sock, "_sslobj", None), method, None)
    if getter is None:
        return None
    return [item if isinstance(item, bytes) else item.public_bytes(ssl._ssl.ENCODING_DER) for item in getter() or []]


class PinnedSSLSocket(ssl.SSLSocket):
    """An ``SSLSocket`` that checks the context's pin-set right after the handshake."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError:
            # paho does not close a socket whose handshake failed; without this each failed attempt leaks it.
            self.close()
            raise
        context = self.context
        pin_set: Optional[PinSet] = getattr(context, "pin_set", None)
        server = f"{getattr(context, 'peer_label', '')}" or str(self.server_hostname)
        if pin_set is None:
            self.close()
            raise ssl.SSLError("no pin-set is attached to this TLS context; refusing the connection")

        try:
            matched = pin_set.check_chain(verified_chain_der(self), server)
        except PinMismatchError as exc:
            logger.error(
                "pin mismatch from %s: expected one of [%s], broker presented [%s]; closed before any MQTT byte",
                server, ", ".join(map(str, exc.expected)), ", ".join(map(str, exc.presented)),
            )
            context.pin_failures += 1
            self.close()
            raise
        if matched is not None:
            logger.debug("broker %s matched pin %s over %s", server, matched, self.version())


class PinnedContext(ssl.SSLContext):
    """An ``SSLContext`` carrying the pin-set, an optional TLS server name and a failure count.

    ``server_name`` replaces the host that paho passes as ``server_hostname``,
    so a broker reached by IP address is still checked against the name in its
    certificate.
    """

    pin_set: Optional[PinSet] = None
    server_name: Optional[str] = None
    peer_label: str = ""
    pin_failures: int = 0

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True,
                    suppress_ragged_eofs=True, server_hostname=None, session=None):
        if self.server_name:
            server_hostname = self.server_name
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def load_broker_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    """Load the broker CA bundle, raising ``ConfigError`` that names the file when OpenSSL cannot use it."""
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError([
            f"{ca_file}: cannot load the CA file ({reason}); point broker.ca_file (or --ca-file) at the "
            "PEM certificate(s) of the CA that issued the broker certificate"
        ]) from None


def create_client_context(
    broker: BrokerConfig,
    identity: "Optional[Credential]",
    pin_set: Optional[PinSet] = None,
    ca_file: Optional[Path] = None,
) -> PinnedContext:
    """Build the context for connections to the broker.

    The order matters: the protocol floor and verification mode are set before
    the CA is loaded, and the client certificate comes last.
    """
    context = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
    # TLS 1.2 is the floor; 1.0 and 1.1 lack modern AEAD suites.
    context.minimum_version = _TLS_VERSIONS[broker.tls_min_version]
    # PROTOCOL_TLS_CLIENT already sets these; stating them keeps a later edit from weakening them.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    # Only the broker's own CA bundle: the system store would let any public CA vouch for the broker.
    load_broker_ca(context, Path(ca_file or broker.ca_file))
    context.sslsocket_class = PinnedSSLSocket
    context.pin_set = pin_set if pin_set is not None else broker.pin_set
    context.server_name = broker.server_name
    context.peer_label = f"{broker.host}:{broker.port}"
    context.pin_failures = 0

    if identity is not None and identity.key_source == "tpm":
        # Imported here because edge_agent.tpm imports this module.
        from edge_agent.tpm import attach_tpm_identity

        attach_tpm_identity(context, identity, ca_file or broker.ca_file)
    elif identity is not None:
        load_client_certificate(context, identity)
    return context


def load_client_certificate(context: ssl.SSLContext, identity: "Credential") -> None:
    """Present the device certificate and its chain as the TLS client certificate.

    ``load_cert_chain`` reads PEM files only, so the chain and a DER key are
    handed over as PEM through anonymous in-memory files. The private key is
    never copied to disk.
    """
    key_data = identity.key_path.read_bytes()
    passphrase = identity.key_passphrase
    # Without a password OpenSSL would prompt on the terminal; a service must fail instead.
    password = passphrase if passphrase is not None else _no_passphrase(identity.key_path)

    if b"-----BEGIN" in key_data:
        with _memory_file(identity.chain_pem) as cert_file:
            context.load_cert_chain(cert_file, str(identity.key_path), password=password)
        return

    key_pem = der_key_as_pem(identity.key_path, key_data)
    with _memory_file(identity.chain_pem) as cert_file, _memory_file(key_pem) as key_file:
        context.load_cert_chain(cert_file, key_file, password=password)


# DER tags that tell the private key structures apart.
_DER_INTEGER, _DER_OCTET_STRING, _DER_SEQUENCE = 0x02, 0x04, 0x30


def der_key_as_pem(key_path: Path, data: bytes) -> bytes:
    """Wrap a DER private key in PEM with the label of its structure; padding after the key is dropped.

    The label comes from the shape of the key: PKCS#8 (plain or encrypted),
    PKCS#1 RSA or SEC 1 EC. OpenSSL decodes the contents when the context loads it.
    """
    try:
        _, end = der_element_span(data, 0, len(data))
        label = _der_key_label(data[:end])
    except ValueError as exc:
        raise IdentityError(
            f"{key_path}: cannot load the private key: the file is not a PEM or DER private key ({exc})",
            str(key_path),
            "key-load",
        ) from None
    body = base64.b64encode(data[:end])
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"\n".join([f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode(), b""])


def _der_key_label(der: bytes) -> str:
    if der[0] != _DER_SEQUENCE:
        raise ValueError("no outer SEQUENCE")
    fields = der_children(der, 0, len(der))
    tags = [tag for tag, *_ in fields[:2]]
    if tags == [_DER_SEQUENCE, _DER_OCTET_STRING]:
        return "ENCRYPTED PRIVATE KEY"
    if tags == [_DER_INTEGER, _DER_SEQUENCE]:
        return "PRIVATE KEY"
    if tags == [_DER_INTEGER, _DER_INTEGER]:
        return "RSA PRIVATE KEY"
    if tags == [_DER_INTEGER, _DER_OCTET_STRING]:
        return "EC PRIVATE KEY"
    raise ValueError("not a PKCS#8, PKCS#1 or SEC 1 private key structure")


def _no_passphrase(key_path: Path):
    def refuse() -> bytes:
        raise IdentityError(f"{key_path}: the private key is encrypted and no passphrase is configured", str(key_path), "key-load")

    return refuse


class _memory_file:
    """A path to bytes held in an anonymous memory file (``memfd``), falling back to a private temp file."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._fd: Optional[int] = None
        self._temp = None

    def __enter__(self) -> str:
        if hasattr(os, "memfd_create"):
            self._fd = os.memfd_create("edge-agent", getattr(os, "MFD_CLOEXEC", 0))
            os.write(self._fd, self._data)
            return f"/proc/self/fd/{self._fd}"
        # NOTE: without memfd (non-Linux) the PEM goes to a 0600 temp file for the
        # moment load_cert_chain reads it.
        self._temp = tempfile.NamedTemporaryFile(prefix="edge-agent-", suffix=".pem")
        self._temp.write(self._data)
        self._temp.flush()
        return self._temp.name

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.close(self._fd)
        if self._temp is not None:
            self._temp.close()
