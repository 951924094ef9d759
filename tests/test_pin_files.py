"""``edge-agent pin FILE``: pins of certificates, keys and CSRs agree with the openssl pipeline."""

import datetime
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from edge_agent.cli import main
from edge_agent.devpki import issue_server_cert, make_ca
from edge_agent.pinfiles import read_pin_sources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEY_KINDS = ("rsa-2048", "rsa-3072", "rsa-4096", "rsa-8192", "ec-p256", "ec-p384", "ec-p521", "ed25519")
UTC = datetime.timezone.utc


def generate(kind: str):
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[4:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    curve = {"ec-p256": ec.SECP256R1, "ec-p384": ec.SECP384R1, "ec-p521": ec.SECP521R1}[kind]
    return ec.generate_private_key(curve())


@pytest.fixture(scope="session")
def private_keys():
    """Generate each key kind once per session; RSA 8192 takes seconds."""
    cache: Dict[str, object] = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = generate(kind)
        return cache[kind]

    return get


def openssl(*args: str, data: bytes = b"") -> bytes:
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True).stdout


def openssl_pin(public_pem: bytes) -> str:
    """The documented pipeline: pkey -pubin -outform der | dgst -sha256 -binary | enc -base64."""
    der = openssl("pkey", "-pubin", "-outform", "der", data=public_pem)
    digest = openssl("dgst", "-sha256", "-binary", data=der)
    return "sha256//" + openssl("enc", "-base64", data=digest).decode().strip()


def _signature_hash(key):
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def write_forms(folder: Path, key) -> Dict[str, Path]:
    """Write the key, its public half, a self-signed certificate and a CSR, each in PEM and DER."""
    folder.mkdir(parents=True, exist_ok=True)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pin test")])
    now = datetime.datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, _signature_hash(key))
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, _signature_hash(key))

    pkcs8 = serialization.PrivateFormat.PKCS8
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    none = serialization.NoEncryption()
    contents = {
        "key.pem": key.private_bytes(serialization.Encoding.PEM, pkcs8, none),
        "key.der": key.private_bytes(serialization.Encoding.DER, pkcs8, none),
        "pub.pem": key.public_key().public_bytes(serialization.Encoding.PEM, spki),
        "pub.der": key.public_key().public_bytes(serialization.Encoding.DER, spki),
        "cert.pem": certificate.public_bytes(serialization.Encoding.PEM),
        "cert.der": certificate.public_bytes(serialization.Encoding.DER),
        "csr.pem": csr.public_bytes(serialization.Encoding.PEM),
        "csr.der": csr.public_bytes(serialization.Encoding.DER),
    }
    paths = {}
    for file_name, data in contents.items():
        paths[file_name] = folder / file_name
        paths[file_name].write_bytes(data)
        paths[file_name].chmod(0o600)
    return paths


def pins_printed(capsys, *args: str) -> Dict[str, str]:
    """Run ``edge-agent pin`` in-process; map each file name to the pin printed for it."""
    code = main(["pin", *args])
    out = capsys.readouterr().out
    assert code == 0
    printed = {}
    for line in out.splitlines():
        pin, rest = line.split("  ", 1)
        printed[Path(rest.split(":", 1)[0]).name] = pin
    return printed


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_every_form_matches_openssl(kind, private_keys, tmp_path, capsys):
    paths = write_forms(tmp_path / kind, private_keys(kind))
    public_pem = openssl("pkey", "-in", str(paths["key.pem"]), "-pubout")
    expected = openssl_pin(public_pem)

    printed = pins_printed(capsys, *map(str, paths.values()))

    for form in paths:
        assert printed[form] == expected, f"{kind} {form}"


def test_certificate_pin_matches_openssl_x509(pki, capsys):
    public_pem = openssl("x509", "-in", str(pki.broker_cert), "-pubkey", "-noout")

    printed = pins_printed(capsys, str(pki.broker_cert))

    assert printed["broker.pem"] == openssl_pin(public_pem)


def test_bundle_lists_every_certificate(tmp_path):
    root = make_ca("bundle root CA")
    intermediate = make_ca("bundle intermediate CA", issuer=root)
    leaf = issue_server_cert(intermediate, ("broker.example.net",))
    bundle = tmp_path / "chain.pem"
    bundle.write_bytes(b"".join(
        c.certificate.public_bytes(serialization.Encoding.PEM) for c in (leaf, intermediate, root)
    ))

    sources = read_pin_sources(bundle)

    assert [s.index for s in sources] == [1, 2, 3]
    assert [s.pin for s in sources] == [leaf.pin, intermediate.pin, root.pin]
    assert "CN=broker.example.net" in sources[0].description
    assert "CN=bundle intermediate CA" in sources[1].description
    assert sources[0].issuer == intermediate.certificate.subject.rfc4514_string()


def test_openssl_native_key_formats(tmp_path, capsys):
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(openssl("ecparam", "-name", "prime256v1", "-genkey"))
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(openssl("genrsa", "-traditional", "2048"))
    rsa_public = tmp_path / "rsa-pkcs1.pub"
    rsa_public.write_bytes(openssl("rsa", "-in", str(rsa_key), "-RSAPublicKey_out"))
    trusted = tmp_path / "trusted.pem"
    certificate = write_forms(tmp_path / "cert", generate("ec-p256"))["cert.pem"]
    trusted.write_bytes(openssl("x509", "-in", str(certificate), "-trustout", "-addtrust", "serverAuth"))
    with_text = tmp_path / "with-text.pem"
    with_text.write_bytes(openssl("x509", "-in", str(certificate), "-text"))

    printed = pins_printed(capsys, *map(str, (ec_key, rsa_key, rsa_public, trusted, with_text)))

    assert b"EC PARAMETERS" in ec_key.read_bytes()
    assert b"BEGIN RSA PRIVATE KEY" in rsa_key.read_bytes()
    assert b"BEGIN TRUSTED CERTIFICATE" in trusted.read_bytes()
    assert printed["ec.pem"] == openssl_pin(openssl("pkey", "-in", str(ec_key), "-pubout"))
    assert printed["rsa.pem"] == openssl_pin(openssl("pkey", "-in", str(rsa_key), "-pubout"))
    assert printed["rsa-pkcs1.pub"] == printed["rsa.pem"]
    certificate_pin = openssl_pin(openssl("x509", "-in", str(certificate), "-pubkey", "-noout"))
    assert printed["trusted.pem"] == certificate_pin
    assert printed["with-text.pem"] == certificate_pin


def test_private_key_never_printed(tmp_path, capsys):
    key = generate("ec-p256")
    paths = write_forms(tmp_path, key)
    secret = key.private_numbers().private_value

    main(["pin", "--format", "json", str(paths["key.pem"])])
    out = capsys.readouterr().out

    assert str(secret) not in out
    assert format(secret, "x") not in out
    assert "PRIVATE" not in out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                           "-aes-128-cbc", "-pass", "pass:secret"), "encrypted"),
        (lambda d: openssl("genrsa", "-traditional", "-aes128", "-passout", "pass:secret", "2048"), "encrypted"),
        (lambda d: openssl("pkcs8", "-topk8", "-outform", "der", "-v2", "aes-128-cbc", "-passout", "pass:secret",
                           data=openssl("genpkey", "-algorithm", "ED25519")), "encrypted"),
        (lambda d: b"hello, not a key\n", "not a certificate, public key, private key or CSR"),
        (lambda d: b"", "not a certificate, public key, private key or CSR"),
        (lambda d: b"-----BEGIN CERTIFICATE-----\nAAAA\n", "has no END line"),
        (lambda d: b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "contains no certificate"),
        (lambda d: b"-----BEGIN PGP MESSAGE-----\nAAAA\n-----END PGP MESSAGE-----\n", "unsupported PEM block"),
    ],
    ids=["encrypted-pkcs8", "encrypted-legacy", "encrypted-der", "text", "empty", "truncated", "crl-only", "pgp"],
)
def test_bad_file_gives_one_line(make, message, tmp_path, capsys):
    path = tmp_path / "input"
    path.write_bytes(make(tmp_path))

    code = main(["pin", str(path)])
    err = capsys.readouterr().err

    assert code == 1
    assert message in err
    assert str(path) in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_missing_file_names_path(tmp_path, capsys):
    missing = tmp_path / "absent.pem"

    code = main(["pin", str(missing)])
    err = capsys.readouterr().err

    assert code == 1
    assert f"{missing}: cannot read" in err


# --- output formats --------------------------------------------------------


@pytest.fixture
def two_certificates(tmp_path):
    ca = make_ca("format CA")
    leaf = issue_server_cert(ca, ("broker.example.net",))
    path = tmp_path / "pair.pem"
    path.write_bytes(b"".join(c.certificate.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca)))
    return path, leaf.pin, ca.pin


def test_json_format_fields(two_certificates, capsys):
    path, leaf_pin, ca_pin = two_certificates

    main(["pin", "--json", str(path)])
    document = json.loads(capsys.readouterr().out)

    assert [entry["pin"] for entry in document] == [str(leaf_pin), str(ca_pin)]
    assert document[0]["sha256_hex"] == leaf_pin.hex
    assert document[0]["kind"] == "certificate"
    assert document[0]["subject"] == "CN=broker.example.net,O=edge-agent development"
    assert document[0]["file"] == str(path)
    assert document[0]["not_after"].endswith("+00:00")


def test_hex_format(two_certificates, capsys):
    path, leaf_pin, ca_pin = two_certificates

    main(["pin", "--format", "hex", str(path)])
    first = capsys.readouterr().out.splitlines()[0].split()[0]

    assert first == leaf_pin.digest.hex()
    assert len(first) == 64


def test_android_pin_set(two_certificates, capsys):
    path, leaf_pin, ca_pin = two_certificates

    main(["pin", "--format", "android", "--expires", "2027-06-30", str(path)])
    element = ElementTree.fromstring(capsys.readouterr().out)

    assert element.tag == "pin-set"
    assert element.get("expiration") == "2027-06-30"
    assert [pin.get("digest") for pin in element] == ["SHA-256", "SHA-256"]
    assert [pin.text for pin in element] == [leaf_pin.digest_base64, ca_pin.digest_base64]


def test_android_expiry_from_config(two_certificates, write_config, capsys):
    path, _, _ = two_certificates
    config = write_config(broker={"pins_expire": "2028-01-31"})

    main(["pin", "--format", "android", "--config", str(config), str(path)])
    element = ElementTree.fromstring(capsys.readouterr().out)

    assert element.get("expiration") == "2028-01-31"


def test_android_without_expiry(two_certificates, capsys):
    path, _, _ = two_certificates

    main(["pin", "--format", "android", str(path)])
    element = ElementTree.fromstring(capsys.readouterr().out)

    assert "expiration" not in element.attrib


def test_toml_format_parses(two_certificates, capsys):
    path, leaf_pin, ca_pin = two_certificates

    main(["pin", "--format", "toml", str(path)])
    document = tomllib.loads(capsys.readouterr().out)

    assert document["pins"] == [str(leaf_pin), str(ca_pin)]


def test_invalid_expires_is_usage_error(two_certificates, capsys):
    path, _, _ = two_certificates

    with pytest.raises(SystemExit) as info:
        main(["pin", "--format", "android", "--expires", "30.06.2027", str(path)])

    assert info.value.code == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_no_arguments_is_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["pin"])

    assert info.value.code == 2
    assert "give a FILE" in capsys.readouterr().err


# --- real published certificates ----------------------------------------


def test_corpus_pins_match_openssl(corpus_dir, capsys):
    files = sorted(corpus_dir.glob("*.pem"))

    printed = pins_printed(capsys, *map(str, files))

    for path in files:
        if path.name.endswith(".testkey.pem"):
            public_pem = openssl("pkey", "-in", str(path), "-pubout")
        else:
            public_pem = openssl("x509", "-in", str(path), "-pubkey", "-noout")
        assert printed[path.name] == openssl_pin(public_pem), path.name


def test_cli_subprocess_prints_pin(pki, agent_command):
    result = subprocess.run(agent_command("pin", str(pki.broker_cert)), capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{pki.broker_pin}  {pki.broker_cert}: #1 certificate: CN=localhost")
