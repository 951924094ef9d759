"""Pin-set expiry policy, backup pins, SPKI extraction and the TLS failure classifier."""

import datetime
import logging
import socket
import ssl

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.devpki import issue_server_cert, make_ca
from edge_agent.errors import PinSyntaxError
from edge_agent.pinning import (
    EXPIRED,
    EXPIRING,
    NO_EXPIRY,
    VALID,
    Pin,
    PinMismatchError,
    PinSet,
    parse_pin,
    pin_from_certificate,
    spki_from_certificate_der,
)
from edge_agent.tlserrors import TLS_FAILURE_HINTS, classify_tls_error, describe_tls_error

EXPIRES = datetime.date(2027, 6, 30)
DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def chain():
    ca = make_ca("policy CA")
    leaf = issue_server_cert(ca)
    other = issue_server_cert(ca)
    return ca, leaf, other


def der(issued) -> bytes:
    return issued.certificate.public_bytes(Encoding.DER)


def pin_set(leaf, **options) -> PinSet:
    """A pin-set with the leaf's pin and an unrelated backup pin."""
    return PinSet((leaf.pin, Pin(bytes(32))), **options)


# --- expiry states ----------------------------------------------------------


@pytest.mark.parametrize(
    "today, state",
    [
        (EXPIRES - 31 * DAY, VALID),
        (EXPIRES - 30 * DAY, EXPIRING),
        (EXPIRES, EXPIRING),
        (EXPIRES + DAY, EXPIRED),
    ],
    ids=["31-days-before", "30-days-before", "expiry-day", "day-after"],
)
def test_expiry_state_boundaries(today, state, chain):
    _, leaf, _ = chain

    status = pin_set(leaf, expires=EXPIRES, warn_days=30).status(today)

    assert status.state == state


def test_no_expiry_state(chain):
    _, leaf, _ = chain

    status = pin_set(leaf).status(EXPIRES)

    assert status.state == NO_EXPIRY
    assert status.message == ""


def test_expiring_message_names_policy(chain):
    _, leaf, _ = chain

    status = pin_set(leaf, expires=EXPIRES, on_expiry="ca-only").status(EXPIRES - 3 * DAY)

    assert "in 3 days" in status.message
    assert "ca-only" in status.message
    assert status.enforced


def test_enforce_keeps_checking_after_expiry(chain):
    _, leaf, other = chain
    pins = pin_set(leaf, expires=EXPIRES)

    with pytest.raises(PinMismatchError):
        pins.check_chain([der(other)], today=EXPIRES + 365 * DAY)


def test_ca_only_before_expiry_enforces(chain):
    _, leaf, other = chain
    pins = pin_set(leaf, expires=EXPIRES, on_expiry="ca-only")

    with pytest.raises(PinMismatchError):
        pins.check_chain([der(other)], today=EXPIRES)


def test_ca_only_after_expiry_warns_every_time(chain, caplog):
    _, leaf, other = chain
    pins = pin_set(leaf, expires=EXPIRES, on_expiry="ca-only")

    with caplog.at_level(logging.WARNING, logger="edge_agent.pinning"):
        first = pins.check_chain([der(other)], "broker:8883", today=EXPIRES + DAY)
        second = pins.check_chain([der(other)], "broker:8883", today=EXPIRES + DAY)

    skipped = [r for r in caplog.records if "pin check skipped for broker:8883" in r.getMessage()]
    assert first is None
    assert second is None
    assert len(skipped) == 2
    assert str(other.pin) in skipped[0].getMessage()


def test_expiring_warning_rate_limited(chain, caplog):
    _, leaf, _ = chain
    pins = pin_set(leaf, expires=EXPIRES)

    with caplog.at_level(logging.WARNING, logger="edge_agent.pinning"):
        for _ in range(3):
            pins.check_chain([der(leaf)], today=EXPIRES - DAY)

    warnings = [r for r in caplog.records if "pin-set expires on 2027-06-30" in r.getMessage()]
    assert len(warnings) == 1


def test_expired_enforce_logs_error(chain, caplog):
    _, leaf, _ = chain
    pins = pin_set(leaf, expires=EXPIRES)

    with caplog.at_level(logging.WARNING, logger="edge_agent.pinning"):
        matched = pins.check_chain([der(leaf)], today=EXPIRES + 2 * DAY)

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert matched == leaf.pin
    assert "2 days ago" in errors[0].getMessage()
    assert "still enforced" in errors[0].getMessage()


# --- matching and backups ----------------------------------------------------


def test_extra_certificate_is_not_matched(chain):
    _, leaf, other = chain

    with pytest.raises(PinMismatchError) as info:
        pin_set(leaf).check_chain([der(other)])

    assert leaf.pin not in info.value.presented


def test_backup_pins_are_outside_chain(chain):
    ca, leaf, other = chain
    pins = PinSet((leaf.pin, other.pin))

    assert pins.backup_pins([leaf.pin, ca.pin]) == (other.pin,)
    assert pins.backup_pins([leaf.pin, other.pin]) == ()


def test_mismatch_message_is_plain(chain):
    _, leaf, other = chain

    with pytest.raises(PinMismatchError) as info:
        pin_set(leaf).check_chain([der(other)], "broker:8883")

    assert str(info.value).startswith("pin mismatch from broker:8883:")


def test_spki_bytes_match_cryptography(chain):
    _, leaf, _ = chain

    spki = spki_from_certificate_der(der(leaf))

    assert spki == leaf.certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert pin_from_certificate(leaf.certificate) == leaf.pin


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x30\x03\x02\x01\x00", b"\x04\x02ab", b"\x30\x84\xff\xff\xff\xff"])
def test_spki_rejects_malformed_der(data):
    with pytest.raises(ValueError):
        spki_from_certificate_der(data)


def test_pin_parse_hint_for_okhttp():
    okhttp = "sha256/" + Pin(bytes(32)).digest_base64

    with pytest.raises(PinSyntaxError) as info:
        parse_pin(okhttp)

    assert f"write it as '{Pin(bytes(32))}'" in str(info.value)


# --- the classifier ---------------------------------------------------------


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    error.verify_code = code
    error.verify_message = message
    return error


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] failure")
    error.reason = reason
    return error


@pytest.mark.parametrize(
    "error, expected",
    [
        (PinMismatchError((Pin(bytes(32)),), ()), "pin-mismatch"),
        (_verify_error(20, "unable to get local issuer certificate"), "untrusted-chain"),
        (_verify_error(18, "self-signed certificate"), "untrusted-chain"),
        (_verify_error(10, "certificate has expired"), "expired"),
        (_verify_error(9, "certificate is not yet valid"), "not-yet-valid"),
        (_verify_error(62, "Hostname mismatch"), "hostname-mismatch"),
        (_verify_error(64, "IP address mismatch"), "hostname-mismatch"),
        (_verify_error(26, "unsupported certificate purpose"), "certificate-invalid"),
        (_ssl_error("UNSUPPORTED_PROTOCOL"), "tls-version"),
        (_ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"), "tls-version"),
        (_ssl_error("WRONG_VERSION_NUMBER"), "not-tls"),
        (_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "client-certificate-rejected"),
        (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "client-certificate-rejected"),
        (_ssl_error("SSLV3_ALERT_HANDSHAKE_FAILURE"), "handshake-failure"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "closed"),
        (ConnectionResetError(104, "Connection reset by peer"), "reset"),
        (ConnectionRefusedError(111, "Connection refused"), "refused"),
        (TimeoutError("timed out"), "timeout"),
        (socket.gaierror(-2, "Name or service not known"), "dns"),
        (OSError(113, "No route to host"), "network"),
        (ValueError("odd"), "unknown"),
    ],
)
def test_classifier_names_class(error, expected):
    assert classify_tls_error(error) == expected


def test_every_class_has_hint():
    from edge_agent import tlserrors

    classes = {value for name, value in vars(tlserrors).items() if name.isupper() and isinstance(value, str)}
    assert tlserrors.CERTIFICATE_CLASSES <= classes

    assert classes == set(TLS_FAILURE_HINTS)


def test_describe_shows_verify_message():
    text = describe_tls_error(_verify_error(10, "certificate has expired"))

    assert text == "expired: certificate verify failed: certificate has expired (verify code 10)"
