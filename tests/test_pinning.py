"""Pin computation and strict pin syntax."""

import base64
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.errors import PinSyntaxError
from edge_agent.pinning import Pin, PinMismatchError, PinSet, parse_pin, parse_pin_list, pin_from_certificate_der

GOOD = "sha256//" + base64.b64encode(bytes(range(32))).decode()


def test_pin_matches_openssl_pipeline(pki):
    pubkey = subprocess.run(
        ["openssl", "x509", "-in", str(pki.broker_cert), "-pubkey", "-noout"], capture_output=True, check=True
    ).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pubkey, capture_output=True, check=True).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-binary"], input=der, capture_output=True, check=True).stdout

    assert str(pki.broker_pin) == "sha256//" + base64.b64encode(digest).decode()


def test_parse_round_trip():
    assert str(parse_pin(GOOD)) == GOOD
    assert str(parse_pin(f"  {GOOD}\n")) == GOOD


@given(st.binary(min_size=32, max_size=32))
def test_any_digest_round_trips(digest):
    pin = Pin(digest)

    assert parse_pin(str(pin)) == pin


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty pin"),
        (GOOD[len("sha256//"):], "lacks the 'sha256//' prefix"),
        (GOOD.replace("sha256//", "sha256/"), "OkHttp's single-slash spelling"),
        (f'pin-sha256="{GOOD[8:]}"', "HPKP header spelling"),
        ("sha1//" + base64.b64encode(bytes(20)).decode(), "SHA-1 pin"),
        (bytes(range(32)).hex(), "hex digest"),
        ("sha256//" + base64.urlsafe_b64encode(bytes([251] * 32)).decode(), "URL-safe base64"),
        ("sha256//AAAA", "expected 44"),
        ("sha256//" + "!" * 44, "not valid base64"),
        ("SHA256//" + GOOD[8:], "lower-case"),
        ("md5//abc", "only 'sha256//' pins"),
    ],
)
def test_bad_pins_explain_themselves(text, message):
    with pytest.raises(PinSyntaxError) as info:
        parse_pin(text)

    assert message in str(info.value)


def test_rejections_show_canonical_form():
    with pytest.raises(PinSyntaxError) as info:
        parse_pin(GOOD.replace("sha256//", "sha256/"))

    assert repr(GOOD) in str(info.value)


def test_curl_list_with_spaces():
    other = "sha256//" + base64.b64encode(bytes(32)).decode()

    pins = parse_pin_list(f" {GOOD} ; {other} ")

    assert [str(p) for p in pins] == [GOOD, other]


@pytest.mark.parametrize(
    "text, message",
    [
        (f"{GOOD};;", "item 2 is empty"),
        (f"{GOOD};{GOOD}", "repeats item 1"),
        (f"{GOOD};sha256//bad", "item 2"),
    ],
)
def test_bad_lists_are_errors(text, message):
    with pytest.raises(PinSyntaxError) as info:
        parse_pin_list(text)

    assert message in str(info.value)


def test_pin_set_matches_any_chain_member(pki):
    leaf = pki.broker_cert.read_bytes()
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(leaf).public_bytes(Encoding.DER)
    pin_set = PinSet((pki.spare_pin, pki.broker_pin))

    assert pin_set.check_chain([der]) == pki.broker_pin
    assert pin_from_certificate_der(der) == pki.broker_pin


def test_pin_set_rejects_empty_chain(pki):
    with pytest.raises(PinMismatchError):
        PinSet((pki.spare_pin, pki.broker_pin)).check_chain([])


def test_mismatch_lists_both_sides(pki):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(pki.broker_cert.read_bytes()).public_bytes(Encoding.DER)

    with pytest.raises(PinMismatchError) as info:
        PinSet((pki.spare_pin,)).check_chain([der], "broker:8883")

    assert str(pki.spare_pin) in str(info.value)
    assert str(pki.broker_pin) in str(info.value)
    assert "broker:8883" in str(info.value)


def test_pasted_pin_with_text_after():
    with pytest.raises(PinSyntaxError) as info:
        parse_pin(f"{GOOD}  /etc/broker.pem: certificate CN=broker")

    assert "text after the pin" in str(info.value)
    assert repr(GOOD) in str(info.value)


def test_empty_item_in_list_form():
    with pytest.raises(PinSyntaxError) as info:
        parse_pin_list([GOOD, ""])

    assert "remove the empty string" in str(info.value)
