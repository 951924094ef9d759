"""Loading certificates and private keys: PEM and DER, padding, CRLF, passphrases."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.name import _ASN1Type
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.certfiles import load_certificates, load_private_key, read_passphrase
from edge_agent.devpki import issue_idevid, make_ca, new_key
from edge_agent.errors import IdentityError
from identity_pki import check, der, files_for, key_bytes, pem, result, retag_printable_string, write_bytes, write_key

Encoding = serialization.Encoding
PrivateFormat = serialization.PrivateFormat


@pytest.fixture(scope="module")
def ca():
    return make_ca("files test CA")


@pytest.fixture(scope="module")
def device(ca):
    return issue_idevid(ca, "FILES-0001")


def test_pem_with_crlf_and_text_between(tmp_path, ca, device):
    bundle = b"subject=device\r\n" + pem(device.certificate) + b"issuer text\r\n" + pem(ca.certificate)
    path = write_bytes(tmp_path / "bundle.pem", bundle.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"))

    certificates = load_certificates(path)

    assert certificates == [device.certificate, ca.certificate]


@pytest.mark.parametrize("padding", [b"\xff" * 61, b"\x00" * 200, b"\x00\xff\x00"])
def test_padded_der_is_trimmed(tmp_path, device, padding):
    path = write_bytes(tmp_path / "device.der", der(device.certificate) + padding)

    assert load_certificates(path) == [device.certificate]


def test_concatenated_der_chain(tmp_path, ca, device):
    path = write_bytes(tmp_path / "chain.der", der(device.certificate) + der(ca.certificate) + b"\xff" * 8)

    assert load_certificates(path) == [device.certificate, ca.certificate]


def test_der_with_trailing_garbage(tmp_path, device):
    path = write_bytes(tmp_path / "device.der", der(device.certificate) + b"\x05\x00junk")

    with pytest.raises(IdentityError) as info:
        load_certificates(path)

    assert str(path) in str(info.value)
    assert "not the start of a DER SEQUENCE or padding" in str(info.value)


def test_private_key_in_bundle_is_named(tmp_path, device):
    path = write_bytes(tmp_path / "combined.pem", pem(device.certificate) + key_bytes(device.key))

    with pytest.raises(IdentityError) as info:
        load_certificates(path, "device certificate")

    assert "contains a private key (PRIVATE KEY)" in str(info.value)
    assert "keep the key in its own file" in str(info.value)


def test_other_pem_block_is_rejected(tmp_path, device):
    public = device.key.public_key().public_bytes(Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = write_bytes(tmp_path / "mixed.pem", pem(device.certificate) + public)

    with pytest.raises(IdentityError) as info:
        load_certificates(path)

    assert "'PUBLIC KEY' PEM block, which is not a certificate" in str(info.value)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", "contains no certificate"),
        (b"\xff" * 32, "contains no certificate"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n", "has no matching END line"),
        (b"\x30\x82\x05\x00\x01", "runs past the end"),
    ],
)
def test_broken_certificate_file(tmp_path, data, expected):
    path = write_bytes(tmp_path / "broken.pem", data)

    with pytest.raises(IdentityError) as info:
        load_certificates(path)

    assert expected in str(info.value)


def test_forbidden_printable_string_is_explained(tmp_path, ca):
    device = issue_idevid(ca, "JADA_f2@01", serial_string_type=_ASN1Type.UTF8String)
    data = retag_printable_string(der(device.certificate), "JADA_f2@01", ca.key)
    path = write_bytes(tmp_path / "printable.der", data)

    with pytest.raises(IdentityError) as info:
        load_certificates(path)

    message = str(info.value)
    assert str(path) in message
    assert "PrintableString" in message
    assert "ask the manufacturer for a corrected certificate" in message


def test_forbidden_printable_string_in_report(tmp_path, ca):
    device = issue_idevid(ca, "JADA_f2@01", serial_string_type=_ASN1Type.UTF8String)
    files = files_for(tmp_path, device, [ca.certificate])
    write_bytes(files.cert, retag_printable_string(der(device.certificate), "JADA_f2@01", ca.key))

    report = check(files)

    assert result(report, "certificate").status == "error"
    assert result(report, "chain").status == "skipped"


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_never_crash_loader(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "random.bin"
    path.write_bytes(data)

    try:
        load_certificates(path)
    except IdentityError:
        pass


@settings(max_examples=100, deadline=None)
@given(prefix=st.binary(max_size=40), cut=st.integers(min_value=0, max_value=400))
def test_mangled_der_never_crashes_loader(tmp_path_factory, device, prefix, cut):
    path = tmp_path_factory.mktemp("fuzz") / "mangled.der"
    path.write_bytes(b"\x30" + prefix + der(device.certificate)[:cut])

    try:
        load_certificates(path)
    except IdentityError:
        pass


# --- private keys ----------------------------------------------------------


@pytest.mark.parametrize(
    "kind, encoding, fmt",
    [
        ("rsa-2048", Encoding.PEM, PrivateFormat.TraditionalOpenSSL),
        ("rsa-2048", Encoding.DER, PrivateFormat.TraditionalOpenSSL),
        ("ec-p256", Encoding.PEM, PrivateFormat.TraditionalOpenSSL),
        ("ec-p384", Encoding.DER, PrivateFormat.TraditionalOpenSSL),
        ("ec-p256", Encoding.PEM, PrivateFormat.PKCS8),
        ("ec-p256", Encoding.DER, PrivateFormat.PKCS8),
    ],
    ids=["pkcs1-pem", "pkcs1-der", "sec1-pem", "sec1-der", "pkcs8-pem", "pkcs8-der"],
)
def test_key_formats_load(tmp_path, kind, encoding, fmt):
    key = new_key(kind)
    path = write_key(tmp_path / "device.key", key, encoding=encoding, fmt=fmt)

    loaded = load_private_key(path)

    assert loaded.private_numbers() == key.private_numbers()


def test_padded_der_key_loads(tmp_path, device):
    path = write_bytes(tmp_path / "device.key", key_bytes(device.key, encoding=Encoding.DER) + b"\xff" * 40, mode=0o600)

    assert load_private_key(path).private_numbers() == device.key.private_numbers()


def test_crlf_pem_key_loads(tmp_path, device):
    data = b"key for FILES-0001\r\n" + key_bytes(device.key).replace(b"\n", b"\r\n")
    path = write_bytes(tmp_path / "device.key", data, mode=0o600)

    assert load_private_key(path).private_numbers() == device.key.private_numbers()


@pytest.mark.parametrize("encoding", [Encoding.PEM, Encoding.DER])
def test_encrypted_key_with_passphrase_file(tmp_path, device, encoding):
    key_path = write_key(tmp_path / "device.key", device.key, encoding=encoding, passphrase=b"s3cret pass")
    passphrase_path = write_bytes(tmp_path / "passphrase", b"s3cret pass\n", mode=0o600)

    loaded = load_private_key(key_path, read_passphrase(passphrase_path))

    assert loaded.private_numbers() == device.key.private_numbers()


def test_encrypted_key_without_passphrase(tmp_path, device):
    key_path = write_key(tmp_path / "device.key", device.key, passphrase=b"s3cret pass")

    with pytest.raises(IdentityError) as info:
        load_private_key(key_path)

    assert "encrypted and no passphrase is configured" in str(info.value)
    assert "identity.key_passphrase_file" in str(info.value)


def test_encrypted_key_wrong_passphrase(tmp_path, device):
    key_path = write_key(tmp_path / "device.key", device.key, passphrase=b"s3cret pass")

    with pytest.raises(IdentityError) as info:
        load_private_key(key_path, b"hunter2-typo")

    assert "the passphrase is wrong" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_passphrase_from_systemd_credential(tmp_path, device, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write_bytes(credentials / "idevid-key-passphrase", b"from systemd", mode=0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    key_path = write_key(tmp_path / "device.key", device.key, passphrase=b"from systemd")

    passphrase = read_passphrase(None, "idevid-key-passphrase")

    assert load_private_key(key_path, passphrase).private_numbers() == device.key.private_numbers()


def test_credential_without_systemd(monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)

    with pytest.raises(IdentityError) as info:
        read_passphrase(None, "idevid-key-passphrase")

    assert "$CREDENTIALS_DIRECTORY is not set" in str(info.value)
    assert "LoadCredential=idevid-key-passphrase:" in str(info.value)


def test_passphrase_file_and_credential_conflict(tmp_path):
    with pytest.raises(IdentityError) as info:
        read_passphrase(tmp_path / "passphrase", "name")

    assert "are both set; keep one of them" in str(info.value)


def test_empty_passphrase_file(tmp_path):
    path = write_bytes(tmp_path / "passphrase", b"\n", mode=0o600)

    with pytest.raises(IdentityError) as info:
        read_passphrase(path)

    assert "the key passphrase is empty" in str(info.value)


def test_two_keys_in_one_file(tmp_path, device):
    path = write_bytes(tmp_path / "device.key", key_bytes(device.key) + key_bytes(new_key()), mode=0o600)

    with pytest.raises(IdentityError) as info:
        load_private_key(path)

    assert "expected exactly one private key block" in str(info.value)
