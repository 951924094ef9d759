"""Checks that talk to the broker: lookup, TCP, TLS, pins, certificate expiry and MQTT CONNECT.

Each step is bounded by ``DiagnoseContext.timeout_s`` and runs only when the
one before it succeeded, so a gateway without a network finishes quickly.
The agent's own TLS context does the TLS and pin checks. The first MQTT
byte, CONNECT, is sent only after that context accepted the broker's pins.
"""

import ipaddress
import socket
import ssl
import threading
import time
from typing import List, Optional, Tuple

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.diagnose import adapters, classify
from edge_agent.diagnose.context import DiagnoseContext, TlsOutcome, labelled, ok, result, skipped
from edge_agent.diagnose.adapters import CERT_WARN_DAYS
from edge_agent.diagnose.local_checks import NO_CONFIG, ensure_identity
from edge_agent.diagnose.model import CheckResult, Detail, Status
from edge_agent.diagnose.render import format_utc
from edge_agent.diagnose.service_checks import agent_holds_session
from edge_agent.errors import EdgeAgentError
from edge_agent.pinning import Pin, PinMismatchError, pin_from_certificate

# With TLS 1.3 the broker checks the client certificate after the handshake
# and sends an alert when it rejects it. The TLS check waits this long for one.
CLIENT_CERT_VERDICT_S = 1.5
MAX_ADDRESSES = 4


def _skip_reason(ctx: DiagnoseContext) -> Optional[str]:
    if ctx.offline:
        return "offline mode (--offline)"
    if ctx.config is None:
        return NO_CONFIG
    return None


# --- name lookup and TCP ------------------------------------------------------


def check_resolve(ctx: DiagnoseContext) -> CheckResult:
    reason = _skip_reason(ctx)
    if reason:
        return skipped("broker.resolve", reason)
    host, port = ctx.config.broker.host, ctx.config.broker.port

    if _is_ip_address(host):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ctx.addresses = [(family, (host, port))]
        return ok("broker.resolve", f"{host} is an IP address; no lookup needed")
    if _is_reserved_invalid(host):
        return result(
            "broker.resolve", Status.ERROR, f"{host} is under the reserved .invalid domain, which never resolves",
            failure=classify.DNS_FAILURE,
        )

    try:
        infos = _getaddrinfo_bounded(host, port, ctx.timeout_s)
    except TimeoutError:
        return result(
            "broker.resolve", Status.ERROR, f"no DNS response for {host} within {ctx.timeout_s:g} s",
            failure=classify.TIMED_OUT,
        )
    except OSError as exc:
        return result(
            "broker.resolve", Status.ERROR, f"{host} does not resolve: {classify.describe_error(exc)}",
            failure=classify.DNS_FAILURE,
        )

    ctx.addresses = _unique_addresses(infos)[:MAX_ADDRESSES]
    listed = ", ".join(address[0] for _, address in ctx.addresses)
    return ok("broker.resolve", f"{host} resolves to {listed}")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_reserved_invalid(host: str) -> bool:
    # RFC 6761 section 6.4: names under .invalid never resolve, so resolvers
    # should answer at once without asking a DNS server.
    name = host.rstrip(".").lower()
    return name == "invalid" or name.endswith(".invalid")


def _getaddrinfo_bounded(host: str, port: int, timeout_s: float) -> list:
    """Call getaddrinfo in a daemon thread, because it has no timeout of its own."""
    outcome: dict = {}

    def lookup() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=lookup, name=f"diagnose-dns-{host}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"no DNS response for {host} within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["infos"]


def _unique_addresses(infos: list) -> List[Tuple[int, tuple]]:
    seen, addresses = set(), []
    for family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.add(sockaddr[0])
            addresses.append((family, sockaddr))
    return addresses


def check_tcp(ctx: DiagnoseContext) -> CheckResult:
    reason = _skip_reason(ctx) or (None if ctx.addresses else "the broker host name did not resolve")
    if reason:
        return skipped("broker.tcp", reason)

    failures: List[Detail] = []
    last_error: Optional[OSError] = None
    for family, address in ctx.addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(ctx.timeout_s)
        started = time.monotonic()
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last_error = exc
            failures.append(Detail("failed", f"{_endpoint(address)}: {classify.describe_error(exc)}"))
            continue
        ctx.connected_socket, ctx.peer = sock, address
        elapsed_ms = (time.monotonic() - started) * 1000
        return ok("broker.tcp", f"connected to {_endpoint(address)} in {elapsed_ms:.0f} ms", tuple(failures))

    failure = adapters.classify_tls_failure(last_error)
    finding = f"{_endpoint(ctx.addresses[-1][1])}: {failure.summary} ({classify.describe_error(last_error)})"
    return result("broker.tcp", Status.ERROR, finding, failure=failure, details=tuple(failures[:-1]))


def _endpoint(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- TLS and pins ---------------------------------------------------------------


def check_tls(ctx: DiagnoseContext) -> CheckResult:
    reason = _skip_reason(ctx) or (None if ctx.connected_socket else "no TCP connection to the broker")
    if reason is None and ctx.crng_ready is False:
        reason = "the kernel random generator is not ready, so a TLS handshake would block (see entropy)"
    if reason:
        return skipped("broker.tls", reason)

    broker = ctx.config.broker
    identity = ensure_identity(ctx).identity
    sock, ctx.connected_socket = ctx.connected_socket, None
    peer = ctx.peer
    sock.settimeout(ctx.timeout_s)
    try:
        context = adapters.client_context(broker, identity)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        return result(
            "broker.tls", Status.ERROR, f"cannot load broker.ca_file {broker.ca_file}: {classify.describe_error(exc)}",
            "Point broker.ca_file at the PEM file of the CA that issued the broker certificate.",
        )

    try:
        tls_sock = context.wrap_socket(sock, server_hostname=broker.host)
    except PinMismatchError as exc:
        sock.close()
        ctx.tls = TlsOutcome(handshake_ok=True, pin_checked=True, presented_pins=exc.presented)
        ctx.tls.chain = _presented_chain(ctx, peer)
        finding = (
            f"the chain is verified for {broker.tls_server_name} against broker.ca_file; "
            "the pin check then closed the connection before any MQTT byte"
        )
        return ok("broker.tls", finding)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        return _tls_failure(ctx, exc, peer, identity is not None)

    with tls_sock:
        ctx.tls = _verified_outcome(ctx, tls_sock)
        finding = f"{ctx.tls.version} {ctx.tls.cipher}, chain verified for {broker.tls_server_name}"
        rejection = _client_certificate_verdict(tls_sock) if identity is not None else None
    if rejection is not None:
        ctx.tls.handshake_ok = False
        ctx.tls.failure = classify.CLIENT_CERT_REJECTED
        return result(
            "broker.tls", Status.ERROR, f"{finding}, but the broker then rejected the device certificate ({rejection})",
            failure=classify.CLIENT_CERT_REJECTED,
        )
    if identity is None:
        return result(
            "broker.tls", Status.WARNING, f"{finding}; no client certificate presented (the identity did not load)",
            "Fix the identity checks above; the broker requires the device certificate.",
        )
    return ok("broker.tls", f"{finding}; device certificate accepted")


def _verified_outcome(ctx: DiagnoseContext, tls_sock: ssl.SSLSocket) -> TlsOutcome:
    pin_set = ctx.config.broker.pin_set
    chain = adapters.verified_chain(tls_sock)
    presented = tuple(pin_from_certificate(c) for c in chain)
    cipher = tls_sock.cipher()
    return TlsOutcome(
        handshake_ok=True,
        version=tls_sock.version() or "",
        cipher=cipher[0] if cipher else "",
        chain=chain,
        pin_checked=True,
        pins_enforced=pin_set.enforced(ctx.now().date()),
        matched_pin=pin_set.first_match(presented),
        presented_pins=presented,
    )


def _client_certificate_verdict(tls_sock: ssl.SSLSocket) -> Optional[str]:
    """Listen briefly after the handshake; return why the broker rejected the client, or None.

    With TLS 1.3 the broker checks the client certificate after the client has
    finished its handshake, and sends an alert when it rejects it. A broker that
    accepted it waits silently for CONNECT, which this check never sends.
    """
    if tls_sock.version() != "TLSv1.3":
        return None  # TLS 1.2 rejects the client certificate inside the handshake.
    tls_sock.settimeout(CLIENT_CERT_VERDICT_S)
    try:
        data = tls_sock.recv(1)
    except (socket.timeout, TimeoutError):
        return None
    except (ssl.SSLError, OSError) as exc:
        return classify.describe_error(exc)
    return None if data else "the broker closed the connection after the handshake"


def _tls_failure(ctx: DiagnoseContext, exc: BaseException, peer: tuple, presented_certificate: bool) -> CheckResult:
    failure = adapters.classify_tls_failure(exc)
    ctx.tls = TlsOutcome(handshake_ok=False, failure=failure, detail=classify.describe_error(exc))
    finding = f"{failure.summary}: {ctx.tls.detail}"
    remedy = failure.remedy
    if failure in (classify.CERT_EXPIRED, classify.CERT_NOT_YET_VALID) and ctx.clock_problem():
        remedy = f"Note: {ctx.clock_problem()}, so set the clock first and check again. {remedy}"
    if failure is classify.HANDSHAKE_FAILURE and not presented_certificate:
        finding += "; no client certificate was presented because the identity did not load"

    details: Tuple[Detail, ...] = ()
    if failure in (classify.UNTRUSTED_CHAIN, classify.HOSTNAME_MISMATCH, classify.CERT_EXPIRED, classify.CERT_NOT_YET_VALID):
        ctx.tls.chain = _presented_chain(ctx, peer)
        details = _presented_leaf_details(ctx.tls.chain)
    return result("broker.tls", Status.ERROR, finding, remedy, failure, details)


def _presented_chain(ctx: DiagnoseContext, peer: tuple) -> List[x509.Certificate]:
    """Fetch the chain the broker presents, without verifying it, to show the technician what it is.

    This second handshake presents no client certificate and sends no data.
    A TLS 1.2 broker that requires a client certificate ends it early, and
    then nothing is shown.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # inspection only; nothing is sent over this connection
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection(peer[:2], timeout=ctx.timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=ctx.config.broker.tls_server_name) as tls_sock:
                return adapters.unverified_chain(tls_sock)
    except (ssl.SSLError, OSError, ValueError):
        return []


def _presented_leaf_details(chain: List[x509.Certificate]) -> Tuple[Detail, ...]:
    if not chain:
        return ()
    leaf = chain[0]
    return (
        Detail("subject", leaf.subject.rfc4514_string()),
        Detail("issuer", leaf.issuer.rfc4514_string()),
        Detail("valid", f"{format_utc(leaf.not_valid_before_utc)} to {format_utc(leaf.not_valid_after_utc)}"),
        Detail("names", ", ".join(_subject_alt_names(leaf)) or "none"),
        Detail("pin", str(pin_from_certificate(leaf)), "unverified"),
    )


def _subject_alt_names(certificate: x509.Certificate) -> List[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(value) for value in names.get_values_for_type(x509.DNSName) + names.get_values_for_type(x509.IPAddress)]


def _short_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={names[0].value}" if names else certificate.subject.rfc4514_string() or "(empty subject)"


def _role(chain: List[x509.Certificate], index: int) -> str:
    if index == 0:
        return "leaf"
    certificate = chain[index]
    return "root" if certificate.issuer == certificate.subject else "CA"


def _tls_skip_reason(ctx: DiagnoseContext) -> Optional[str]:
    reason = _skip_reason(ctx)
    if reason:
        return reason
    if ctx.tls is None:
        return "no TLS handshake with the broker"
    if not ctx.tls.pin_checked:
        return "the TLS handshake failed (see broker.tls)"
    return None


def check_pin(ctx: DiagnoseContext) -> CheckResult:
    reason = _tls_skip_reason(ctx)
    if reason:
        return skipped("broker.pin", reason)

    configured = ctx.config.broker.pins
    details = _pin_details(ctx, configured, ctx.tls)
    if not ctx.tls.pins_enforced:
        return result(
            "broker.pin", Status.WARNING,
            f"the pin-set expired on {ctx.config.broker.pins_expire} and pins_on_expiry is ca-only: pins are not checked",
            "Deploy the current broker pins with a later broker.pins_expire.", details=details,
        )
    if ctx.tls.matched_pin is None:
        finding = (
            f"none of the {len(configured)} configured pins matches the {len(ctx.tls.presented_pins)} "
            "certificates of the broker's verified chain"
        )
        return result("broker.pin", Status.ERROR, finding, failure=classify.PIN_MISMATCH, details=details)

    position = configured.index(ctx.tls.matched_pin) + 1
    where = _matching_certificate(ctx.tls, ctx.tls.matched_pin)
    return ok("broker.pin", f"configured pin {position} of {len(configured)} matches the broker's {where}", details)


def _pin_details(ctx: DiagnoseContext, configured: Tuple[Pin, ...], tls: TlsOutcome) -> Tuple[Detail, ...]:
    """List the configured pins and the presented ones, each on its own line, with short notes."""
    expected_notes = []
    for index, pin in enumerate(configured):
        live = any(pin.matches(presented) for presented in tls.presented_pins)
        expected_notes.append(f"#{index + 1}" + (" match" if live else ""))

    roles = _pin_roles(tls.chain, _load_ca_file(ctx))
    observed_notes = [roles.get(pin, "") for pin in tls.presented_pins]
    return labelled("expected", configured, expected_notes) + labelled("observed", tls.presented_pins, observed_notes)


def _pin_roles(chain: List[x509.Certificate], ca_certificates: List[x509.Certificate]) -> dict:
    """Map the pin of each known certificate to its role: leaf, CA or root."""
    roles = {}
    for certificate in ca_certificates:
        roles[pin_from_certificate(certificate)] = "root" if certificate.issuer == certificate.subject else "CA"
    for index, certificate in enumerate(chain):
        roles[pin_from_certificate(certificate)] = _role(chain, index)
    return roles


def _load_ca_file(ctx: DiagnoseContext) -> List[x509.Certificate]:
    try:
        return adapters.load_certificates(ctx.config.broker.ca_file)
    except EdgeAgentError:
        return []


def _matching_certificate(tls: TlsOutcome, pin: Pin) -> str:
    for index, certificate in enumerate(tls.chain):
        if pin_from_certificate(certificate).matches(pin):
            return f"{_role(tls.chain, index)} certificate ({_short_name(certificate)})"
    return "chain"


def check_backup_pin(ctx: DiagnoseContext) -> CheckResult:
    if ctx.config is None:
        return skipped("pins.backup", NO_CONFIG)
    configured = ctx.config.broker.pins
    if _tls_skip_reason(ctx) is not None:
        return ok("pins.backup", f"{len(configured)} distinct pins configured; which one is live needs the broker")

    backups = [configured.index(p) + 1 for p in ctx.config.broker.pin_set.backup_pins(ctx.tls.presented_pins)]
    if len(backups) == len(configured):
        return skipped("pins.backup", "no configured pin matches the broker (see broker.pin)")
    if backups:
        listed = ", ".join(str(n) for n in backups)
        return ok("pins.backup", f"{len(backups)} backup pin(s) (pin {listed}) match no current certificate, ready for a key rotation")
    return result(
        "pins.backup",
        Status.WARNING,
        "every configured pin matches the broker's current chain; none is kept for a spare key",
        "Add the pin of the broker's spare key ('edge-agent pin spare.key') to broker.pins, so that a key "
        "rotation does not lock the gateway out.",
    )


def check_cert_expiry(ctx: DiagnoseContext) -> CheckResult:
    reason = _skip_reason(ctx)
    if reason:
        return skipped("broker.cert-expiry", reason)
    chain = ctx.tls.chain if ctx.tls is not None else []
    if not chain:
        return skipped("broker.cert-expiry", "the broker's certificates could not be read")

    now = ctx.now()
    details = tuple(
        Detail(_role(chain, i), f"{_short_name(c)} until {c.not_valid_after_utc:%Y-%m-%d}") for i, c in enumerate(chain)
    )
    index, soonest = min(enumerate(chain), key=lambda item: item[1].not_valid_after_utc)
    days = (soonest.not_valid_after_utc - now).days
    name = f"the {_role(chain, index)} certificate ({_short_name(soonest)})"
    if now > soonest.not_valid_after_utc:
        return result(
            "broker.cert-expiry", Status.ERROR, f"{name} expired on {format_utc(soonest.not_valid_after_utc)}",
            failure=classify.CERT_EXPIRED, details=details,
        )
    if days < CERT_WARN_DAYS:
        return result(
            "broker.cert-expiry", Status.WARNING, f"{name} expires in {days} days",
            "Ask the cloud team to renew it, and to add the new key's pin to broker.pins in time.",
            details=details,
        )
    return ok("broker.cert-expiry", f"every certificate of the chain is valid for {days} more days or longer", details)


# --- MQTT ---------------------------------------------------------------------


def check_mqtt_connect(ctx: DiagnoseContext) -> CheckResult:
    reason = _tls_skip_reason(ctx)
    if reason is None and ctx.tls.pins_enforced and ctx.tls.matched_pin is None:
        reason = "no configured pin matches the broker, so the agent sends it no MQTT byte"
    if reason is None and ctx.tls.failure is not None:
        reason = "the broker rejected the TLS connection (see broker.tls)"
    if reason is None and ensure_identity(ctx).identity is None:
        reason = "the device identity did not load (see identity checks)"
    if reason:
        return skipped("mqtt.connect", reason)
    if agent_holds_session(ctx):
        # A second CONNECT with the agent's client id would take its session over.
        return ok("mqtt.connect", "accepted: the running agent is connected with this identity (its state file); not repeated")
    return _mqtt_connect(ctx)


def _mqtt_connect(ctx: DiagnoseContext) -> CheckResult:
    broker = ctx.config.broker
    identity = ctx.identity.identity
    client_id = ctx.config.device_id or identity.device_id
    protocol = mqtt.MQTTv5 if broker.mqtt_version == "5" else mqtt.MQTTv311
    options = {} if protocol == mqtt.MQTTv5 else {"clean_session": True}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **options)
    client.suppress_exceptions = True
    client.tls_set_context(adapters.client_context(broker, identity))
    client.connect_timeout = ctx.timeout_s

    answered = threading.Event()
    outcome: dict = {}
    client.on_connect = lambda _c, _u, _f, code, _p: (outcome.setdefault("code", code), answered.set())
    client.on_disconnect = lambda _c, _u, _f, code, _p: (outcome.setdefault("closed", code), answered.set())

    try:
        client.connect(broker.host, broker.port, keepalive=max(30, int(ctx.timeout_s * 4)))
    except (ssl.SSLError, OSError) as exc:
        failure = adapters.classify_tls_failure(exc)
        return result("mqtt.connect", Status.ERROR, f"{failure.summary}: {classify.describe_error(exc)}", failure=failure)

    client.loop_start()
    try:
        return _connack_result(ctx, client_id, protocol, answered.wait(ctx.timeout_s), outcome)
    finally:
        client.disconnect()
        client.loop_stop()


def _connack_result(ctx: DiagnoseContext, client_id: str, protocol: int, answered: bool, outcome: dict) -> CheckResult:
    version = "5" if protocol == mqtt.MQTTv5 else "3.1.1"
    if not answered:
        return result(
            "mqtt.connect", Status.ERROR, f"no CONNACK within {ctx.timeout_s:g} s after CONNECT as {client_id}",
            failure=classify.TIMED_OUT,
        )
    code = outcome.get("code")
    if code is None:
        return result(
            "mqtt.connect", Status.ERROR,
            f"the broker closed the connection after CONNECT as {client_id}, without a CONNACK",
            failure=classify.classify_connack(None),
        )
    if code.is_failure:
        failure = classify.classify_connack(code.value)
        return result("mqtt.connect", Status.ERROR, f"the broker refused CONNECT as {client_id}: {code}", failure=failure)
    return ok("mqtt.connect", f"CONNECT as {client_id} (MQTT {version}) accepted; disconnected cleanly, nothing published")
