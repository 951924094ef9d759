"""The five identity checks, each shown passing and failing on generated certificates."""

import dataclasses
import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.devpki import DEV_HW_TYPE, issue_idevid, make_ca, new_key
from edge_agent.identity import CHECK_IDS, has_no_expiration
from edge_agent.identity_fields import fingerprint
from identity_pki import UTC, check, der, files_for, result, write_bytes, write_key

PRIVATE_OID = x509.ObjectIdentifier("1.3.6.1.4.1.32473.9.9")
NO_EXPIRATION = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def at(year, month=1, day=1, *time) -> datetime.datetime:
    return datetime.datetime(year, month, day, *time, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca():
    return make_ca("checks test CA", not_before=at(2026, 1, 1))


@pytest.fixture(scope="module")
def device(ca):
    return issue_idevid(ca, "GW-0042", not_before=at(2026, 6, 1), masa_url="masa.example.net:9443")


def test_checks_run_in_order(tmp_path, ca, device):
    report = check(files_for(tmp_path, device, [ca.certificate]))

    assert [c.id for c in report.checks] == list(CHECK_IDS)
    assert [c.status for c in report.checks] == ["ok"] * len(CHECK_IDS)


# --- 1. leaf ---------------------------------------------------------------


def test_leaf_ca_certificate_rejected(tmp_path, ca):
    intermediate = make_ca("checks intermediate", issuer=ca)

    report = check(files_for(tmp_path, intermediate, [ca.certificate]))

    assert result(report, "leaf").status == "error"
    assert "is a CA certificate" in result(report, "leaf").message


def test_leaf_without_digital_signature(tmp_path, ca):
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=True, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )
    leaf = issue_idevid(ca, "GW-KU", key_usage=usage)

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert result(report, "leaf").status == "error"
    assert "lacks digitalSignature" in result(report, "leaf").message


def test_leaf_without_key_usage_accepted(tmp_path, ca):
    leaf = issue_idevid(ca, "GW-NOKU", key_usage=None)

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert result(report, "leaf").status == "ok"


def test_unknown_critical_extension_rejected(tmp_path, ca):
    leaf = issue_idevid(ca, "GW-CRIT", extra_extensions=[(x509.UnrecognizedExtension(PRIVATE_OID, b"\x05\x00"), True)])

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert result(report, "leaf").status == "error"
    assert f"critical extension {PRIVATE_OID.dotted_string} is not processed" in result(report, "leaf").message


def test_unknown_noncritical_extension_accepted(tmp_path, ca):
    leaf = issue_idevid(ca, "GW-NONCRIT", extra_extensions=[(x509.UnrecognizedExtension(PRIVATE_OID, b"\x05\x00"), False)])

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert result(report, "leaf").status == "ok"


@pytest.mark.parametrize(
    "key_factory, key_types, expected",
    [
        (lambda: new_key("ec-p256"), None, "ok"),
        (lambda: new_key("ec-p384"), None, "ok"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), None, "error"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), ("ec-p521",), "ok"),
        (lambda: new_key("rsa-2048"), None, "ok"),
        (lambda: new_key("rsa-1024"), None, "error"),
        (lambda: new_key("rsa-2048"), ("rsa-3072",), "error"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), None, "error"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), ("ed25519",), "ok"),
    ],
    ids=["p256", "p384", "p521-default", "p521-allowed", "rsa2048", "rsa1024", "rsa2048-min3072", "ed25519-default",
         "ed25519-allowed"],
)
def test_leaf_key_type_allow_list(tmp_path, ca, key_factory, key_types, expected):
    leaf = issue_idevid(ca, "GW-KEY", key=key_factory())
    policy = {"key_types": key_types} if key_types else {}

    report = check(files_for(tmp_path, leaf, [ca.certificate]), **policy)

    assert result(report, "leaf").status == expected
    if expected == "error":
        assert "is not allowed by identity.key_types" in result(report, "leaf").message


def test_leaf_without_client_auth_warns(tmp_path, ca):
    leaf = issue_idevid(ca, "GW-EKU", extended_key_usage=[ExtendedKeyUsageOID.SERVER_AUTH])

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert result(report, "leaf").status == "warning"
    assert "lacks clientAuth" in result(report, "leaf").message


# --- 2. key match ----------------------------------------------------------


def test_key_mismatch_rejected(tmp_path, ca, device):
    files = files_for(tmp_path, device, [ca.certificate], key=new_key())

    report = check(files)

    assert result(report, "key-match").status == "error"
    assert f"the private key {files.key} does not belong to the certificate {files.cert}" in result(report, "key-match").message


def test_encrypted_key_with_passphrase_file(tmp_path, ca, device):
    passphrase = write_bytes(tmp_path / "passphrase", b"correct horse\n", mode=0o600)
    files = files_for(tmp_path, device, [ca.certificate], key_passphrase_file=passphrase)
    files = dataclasses.replace(files, key=write_key(tmp_path / "encrypted.key", device.key, passphrase=b"correct horse"))

    report = check(files)

    assert result(report, "key-match").status == "ok"


def test_encrypted_key_without_passphrase_file(tmp_path, ca, device):
    files = files_for(tmp_path, device, [ca.certificate])
    files.key.unlink()
    write_key(files.key, device.key, passphrase=b"correct horse")

    report = check(files)

    assert result(report, "key-match").status == "error"
    assert "encrypted and no passphrase is configured" in result(report, "key-match").message


def test_key_readable_by_others(tmp_path, ca, device):
    files = files_for(tmp_path, device, [ca.certificate])
    files.key.chmod(0o644)

    report = check(files)

    assert result(report, "key-match").status == "error"
    assert f"chmod 600 {files.key}" in result(report, "key-match").message


# --- 3. chain --------------------------------------------------------------


def test_chain_without_authority_key_id(tmp_path, ca):
    leaf = issue_idevid(ca, "GW-NOAKI", authority_key_id=False)

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    with pytest.raises(x509.ExtensionNotFound):
        leaf.certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert result(report, "chain").status == "ok"


def test_chain_ca_noncritical_basic_constraints(tmp_path):
    lax_ca = make_ca("lax CA", basic_constraints_critical=False, key_identifiers=False)
    leaf = issue_idevid(lax_ca, "GW-LAX", authority_key_id=False)

    report = check(files_for(tmp_path, leaf, [lax_ca.certificate]))

    constraints = lax_ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical is False
    assert result(report, "chain").status == "ok"


def test_chain_wrong_key_same_name(tmp_path, ca, device):
    impostor = make_ca("checks test CA")

    report = check(files_for(tmp_path, device, [impostor.certificate]))

    assert impostor.certificate.subject == ca.certificate.subject
    assert result(report, "chain").status == "error"
    assert "same name, different key" in result(report, "chain").message


def test_chain_same_name_anchors_not_confused(tmp_path, ca, device):
    impostor = make_ca("checks test CA")

    report = check(files_for(tmp_path, device, [impostor.certificate, ca.certificate]))

    assert result(report, "chain").status == "ok"
    assert report.path[-1] == ca.certificate


def test_chain_same_name_intermediates(tmp_path, ca):
    right = make_ca("checks intermediate", issuer=ca)
    wrong = make_ca("checks intermediate", issuer=ca)
    leaf = issue_idevid(right, "GW-INT")

    report = check(files_for(tmp_path, leaf, [ca.certificate], intermediates=[wrong.certificate, right.certificate]))

    assert result(report, "chain").status == "ok"
    assert report.path == (leaf.certificate, right.certificate, ca.certificate)


def test_chain_key_identifier_mismatch(tmp_path, ca):
    wrong_aki = x509.AuthorityKeyIdentifier(key_identifier=b"\x01" * 20, authority_cert_issuer=None, authority_cert_serial_number=None)
    leaf = issue_idevid(ca, "GW-AKI", authority_key_id=False, extra_extensions=[(wrong_aki, False)])

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert result(report, "chain").status == "error"
    assert "authorityKeyIdentifier 0101" in result(report, "chain").message


def test_chain_unrelated_anchor(tmp_path, device):
    other = make_ca("some other manufacturer")

    report = check(files_for(tmp_path, device, [other.certificate]))

    assert result(report, "chain").status == "error"
    assert "no configured trust anchor or intermediate is named" in result(report, "chain").message
    assert "identity.trust_anchors" in result(report, "chain").message


def test_chain_intermediate_not_a_ca(tmp_path, ca):
    end_entity = issue_idevid(ca, "GW-NOTCA")
    leaf = issue_idevid(end_entity, "GW-BELOW")

    report = check(files_for(tmp_path, leaf, [ca.certificate], intermediates=[end_entity.certificate]))

    assert result(report, "chain").status == "error"
    assert "basicConstraints cA is false" in result(report, "chain").message


def test_chain_path_length_exceeded(tmp_path):
    root = make_ca("pathlen root", path_length=0)
    intermediate = make_ca("pathlen intermediate", issuer=root)
    leaf = issue_idevid(intermediate, "GW-PATH")

    report = check(files_for(tmp_path, leaf, [root.certificate], intermediates=[intermediate.certificate]))

    assert result(report, "chain").status == "error"
    assert "pathLenConstraint" in result(report, "chain").message


def test_chain_without_anchor_skipped(tmp_path, device):
    report = check(files_for(tmp_path, device, []))

    assert result(report, "chain").status == "skipped"


# --- 4. time ---------------------------------------------------------------


def test_no_expiration_value(tmp_path, ca, device):
    report = check(files_for(tmp_path, device, [ca.certificate]), now=at(2030, 1, 1))

    assert device.certificate.not_valid_after_utc == NO_EXPIRATION
    assert has_no_expiration(device.certificate)
    assert result(report, "time").status == "ok"
    assert "no expiration" in result(report, "time").message
    assert report.to_dict()["no_expiration"] is True


@pytest.mark.parametrize(
    "not_after",
    [at(9999, 12, 31, 23, 59, 58), at(2099, 12, 31, 23, 59, 59), at(9999, 12, 31, 23, 59, 0)],
    ids=["99991231235958Z", "20991231235959Z", "99991231235900Z"],
)
def test_near_miss_is_an_expiry(tmp_path, ca, not_after):
    leaf = issue_idevid(ca, "GW-NEAR", not_after=not_after, not_before=at(2026, 6, 1))

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert not has_no_expiration(leaf.certificate)
    assert report.to_dict()["no_expiration"] is False
    assert "no expiration" not in result(report, "time").message


def test_near_miss_expires_after_date(tmp_path):
    root = make_ca("long-lived CA", not_before=at(2026, 1, 1), not_after=at(9999, 12, 31, 23, 59, 59))
    leaf = issue_idevid(root, "GW-2099", not_after=at(2099, 12, 31, 23, 59, 59), not_before=at(2026, 6, 1))

    report = check(files_for(tmp_path, leaf, [root.certificate]), now=at(2100, 1, 1))

    assert result(report, "time").status == "warning"
    assert "expired on 2099-12-31T23:59:59Z" in result(report, "time").message


def test_expired_leaf_warns_by_default(tmp_path, ca):
    leaf = issue_idevid(ca, "GW-OLD", not_before=at(2026, 6, 1), not_after=at(2027, 1, 1))

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert result(report, "time").status == "warning"
    assert "accepted because identity.strict_time is false" in result(report, "time").message


def test_expired_leaf_strict_time(tmp_path, ca):
    leaf = issue_idevid(ca, "GW-OLD", not_before=at(2026, 6, 1), not_after=at(2027, 1, 1))

    report = check(files_for(tmp_path, leaf, [ca.certificate]), strict_time=True)

    assert result(report, "time").status == "error"


@pytest.mark.parametrize("strict, expected", [(False, "warning"), (True, "error")])
def test_expired_ca_under_valid_leaf(tmp_path, strict, expected):
    old_ca = make_ca("expired CA", not_before=at(2020, 1, 1), not_after=at(2026, 12, 31))
    leaf = issue_idevid(old_ca, "GW-UNDER", not_before=at(2026, 6, 1))

    report = check(files_for(tmp_path, leaf, [old_ca.certificate]), strict_time=strict)

    assert result(report, "chain").status == "ok"
    assert result(report, "time").status == expected
    assert "Trust anchor 'CN=expired CA,O=edge-agent development' expired on 2026-12-31" in result(report, "time").message


def test_not_yet_valid_ca_warns(tmp_path):
    future_ca = make_ca("future CA", not_before=at(2028, 1, 1))
    leaf = issue_idevid(future_ca, "GW-EARLY", not_before=at(2026, 6, 1))

    report = check(files_for(tmp_path, leaf, [future_ca.certificate]))

    assert result(report, "time").status == "warning"
    assert "is not valid before 2028-01-01" in result(report, "time").message


def test_clock_before_build_date_skips(tmp_path, ca):
    old_ca = make_ca("expired CA", not_before=at(2020, 1, 1), not_after=at(2021, 1, 1))
    leaf = issue_idevid(old_ca, "GW-RTC", not_before=at(1970, 1, 1), not_after=at(2021, 1, 1))

    report = check(files_for(tmp_path, leaf, [old_ca.certificate]), now=at(1970, 1, 1, 0, 0, 42), strict_time=True)

    assert result(report, "time").status == "skipped"
    assert "the clock reads 1970-01-01T00:00:42Z, earlier than the agent's build date" in result(report, "time").message
    assert result(report, "chain").status == "ok"


def test_clock_before_leaf_not_before_skips(tmp_path, ca):
    leaf = issue_idevid(ca, "GW-FUTURE", not_before=at(2028, 1, 1))

    report = check(files_for(tmp_path, leaf, [ca.certificate]), strict_time=True)

    assert result(report, "time").status == "skipped"
    assert "earlier than the IDevID's notBefore 2028-01-01T00:00:00Z" in result(report, "time").message


def test_skipped_time_keeps_signature_check(tmp_path, ca, device):
    impostor = make_ca("checks test CA")

    report = check(files_for(tmp_path, device, [impostor.certificate]), now=at(1970, 1, 1))

    assert result(report, "time").status == "skipped"
    assert result(report, "chain").status == "error"


# --- 5. identity -----------------------------------------------------------


def test_identity_fields_extracted(tmp_path, ca, device):
    report = check(files_for(tmp_path, device, [ca.certificate]))

    fields = report.fields
    assert report.device_id == "GW-0042"
    assert report.device_id_source == "subject serialNumber"
    assert fields.hardware_module_name.hw_type == DEV_HW_TYPE
    assert fields.hardware_module_name.hw_serial == b"GW-0042"
    assert fields.masa_url == "masa.example.net:9443"
    assert fields.fingerprint == fingerprint(device.certificate)


def test_fingerprint_hashes_whole_certificate(device):
    expected = hashlib.sha256(der(device.certificate)).hexdigest().upper()

    assert fingerprint(device.certificate).replace(":", "") == expected


def test_serial_in_utf8_string(tmp_path, ca):
    leaf = issue_idevid(ca, "GW-UTF8-0001", serial_string_type=_ASN1Type.UTF8String)

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    attribute = leaf.certificate.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0]
    assert b"\x0c\x0cGW-UTF8-0001" in der(leaf.certificate)
    assert attribute.value == "GW-UTF8-0001"
    assert report.device_id == "GW-UTF8-0001"
    assert [c.status for c in report.checks] == ["ok"] * len(CHECK_IDS)


def test_empty_subject_with_critical_san(tmp_path, ca):
    leaf = issue_idevid(ca, "unused", subject=x509.Name([]), hw_serial=b"HMN-7781", san_critical=True)

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    san = leaf.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert result(report, "leaf").status == "ok"
    assert result(report, "chain").status == "ok"
    assert report.device_id == "HMN-7781"
    assert report.device_id_source == "HardwareModuleName hwSerialNum"


def test_serial_disagreement_warns(tmp_path, ca):
    leaf = issue_idevid(ca, "GW-SUBJECT", hw_serial=b"GW-HARDWARE")

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert result(report, "identity").status == "warning"
    assert "'GW-SUBJECT' and HardwareModuleName serial 'GW-HARDWARE' differ in value" in result(report, "identity").message
    assert report.device_id == "GW-SUBJECT"


def test_serial_case_difference_named(tmp_path, ca):
    leaf = issue_idevid(ca, "00-d0-e5-f2-00-05", hw_serial=b"00-D0-E5-F2-00-05")

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert "differ only in letter case" in result(report, "identity").message


@pytest.mark.parametrize(
    "source, expected",
    [("hardware-module-name", "GW-HARDWARE"), ("subject-serial", "GW-SUBJECT"), ("common-name", "gateway CN")],
)
def test_device_id_source_configurable(tmp_path, ca, source, expected):
    leaf = issue_idevid(ca, "GW-SUBJECT", hw_serial=b"GW-HARDWARE", common_name="gateway CN")

    report = check(files_for(tmp_path, leaf, [ca.certificate]), device_id_source=source)

    assert report.device_id == expected


def test_device_id_source_missing(tmp_path, ca):
    leaf = issue_idevid(ca, "unused", subject=x509.Name([]), san_critical=True)

    report = check(files_for(tmp_path, leaf, [ca.certificate]), device_id_source="subject-serial")

    assert result(report, "identity").status == "error"
    assert "The certificate has no subject serialNumber" in result(report, "identity").message


def test_device_id_unsafe_for_topics(tmp_path, ca):
    leaf = issue_idevid(ca, "GW/0001")

    report = check(files_for(tmp_path, leaf, [ca.certificate]))

    assert result(report, "identity").status == "error"
    assert "set device_id in the configuration" in result(report, "identity").message


def test_configured_device_id_wins(tmp_path, ca, device):
    report = check(files_for(tmp_path, device, [ca.certificate]), device_id="site-7-gw")

    assert report.device_id == "site-7-gw"
    assert report.device_id_source == "configuration"
