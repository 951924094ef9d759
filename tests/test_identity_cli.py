"""``edge-agent identity show`` and ``verify``, on generated identities and on the published IDevID corpus."""

import datetime
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.devpki import issue_idevid, make_ca, write_certificates, write_private_key


def run(capsys, *argv: str):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_show_from_config(write_config, capsys, pki):
    code, out, err = run(capsys, "identity", "show", "--config", str(write_config()))

    assert code == 0, err
    assert f"IDevID {pki.idevid_cert} (the TLS client certificate)" in out
    assert f"serialNumber={pki.device_serial}" in out
    assert "hwType 1.3.6.1.4.1.32473.1.1" in out
    assert "9999-12-31T23:59:59Z (no expiration)" in out
    assert "fingerprint           SHA256 " in out
    assert "trust anchor from" in out
    assert "ok       chain" in out
    assert "PRIVATE KEY" not in out


def test_show_json(write_config, capsys, pki):
    code, out, _ = run(capsys, "identity", "show", "--json", "--config", str(write_config()))

    document = json.loads(out)
    assert code == 0
    assert document["selected"] == "IDevID"
    credential = document["credentials"][0]
    assert credential["device_id"] == pki.device_serial
    assert credential["no_expiration"] is True
    assert credential["hardware_module_name"]["hw_serial"] == pki.device_serial
    assert [c["id"] for c in credential["checks"]] == ["certificate", "leaf", "key-match", "chain", "time", "identity"]


def test_verify_passes(write_config, capsys):
    code, out, _ = run(capsys, "identity", "verify", "--config", str(write_config()))

    assert code == 0
    assert "identity verification passed: 0 error(s)" in out


def test_verify_fails_on_key_mismatch(write_config, capsys, tmp_path):
    other = write_private_key(tmp_path / "other.key", issue_idevid(make_ca("other"), "OTHER").key)

    code, out, _ = run(capsys, "identity", "verify", "--config", str(write_config(identity={"key": str(other)})))

    assert code == 1
    assert "error    IDevID  key-match" in out
    assert "does not belong to the certificate" in out


def test_verify_files_without_config(capsys, pki):
    code, out, _ = run(
        capsys, "identity", "verify", "--cert", str(pki.idevid_cert), "--key", str(pki.idevid_key),
        "--trust-anchor", str(pki.manufacturer_ca),
    )

    assert code == 0
    assert "ok       IDevID  chain" in out


def test_verify_strict_time_option(capsys, tmp_path):
    old = make_ca("old CA", not_before=datetime.datetime(2019, 1, 1), not_after=datetime.datetime(2020, 1, 1))
    leaf = issue_idevid(old, "GW-OLD", not_before=datetime.datetime(2019, 1, 1))
    cert = write_certificates(tmp_path / "leaf.pem", [leaf.certificate])
    anchor = write_certificates(tmp_path / "ca.pem", [old.certificate])

    lenient, _, _ = run(capsys, "identity", "verify", "--cert", str(cert), "--trust-anchor", str(anchor))
    strict, out, _ = run(capsys, "identity", "verify", "--cert", str(cert), "--trust-anchor", str(anchor), "--strict-time")

    assert lenient == 0
    assert strict == 1
    assert "error    IDevID  time" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--config", "agent.toml", "--cert", "x.pem", "--trust-anchor", "ca.pem"], "use either --config or --cert"),
        (["--cert", "x.pem"], "--cert needs at least one --trust-anchor"),
        (["--key", "x.key"], "--key needs --cert"),
        (["--cert", "x.pem", "--trust-anchor", "ca.pem", "--key-type", "dsa"], "--key-type: invalid value 'dsa'"),
    ],
)
def test_verify_usage_errors(capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        main(["identity", "verify", *argv])

    assert info.value.code == 2
    assert expected in capsys.readouterr().err


def test_show_unreadable_certificate(capsys, tmp_path):
    code, out, _ = run(capsys, "identity", "show", "--cert", str(tmp_path / "absent.pem"))

    assert code == 1
    assert "IDevID certificate file not found" in out


def test_verify_subprocess_has_no_traceback(agent_command, write_config, tmp_path):
    broken = tmp_path / "broken.pem"
    broken.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")

    result = subprocess.run(
        agent_command("identity", "verify", "--config", str(write_config(identity={"cert": str(broken)}))),
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert "cannot parse the IDevID certificate file" in result.stdout
    assert "Traceback" not in result.stderr


# --- the published IDevID corpus --------------------------------------------


def corpus_certificates(corpus_dir: Path):
    return sorted(p for p in corpus_dir.glob("*.pem") if not p.name.endswith(".testkey.pem"))


def corpus_anchors(corpus_dir: Path):
    return [p for p in corpus_certificates(corpus_dir) if "-ca" in p.stem]


def test_corpus_every_certificate_judged(corpus_dir, capsys):
    anchors = [arg for path in corpus_anchors(corpus_dir) for arg in ("--trust-anchor", str(path))]
    certificates = corpus_certificates(corpus_dir)

    assert len(certificates) >= 15
    for path in certificates:
        code, out, err = run(capsys, "identity", "show", "--json", "--cert", str(path), *anchors)
        document = json.loads(out)
        credential = document["credentials"][0]
        assert code == 0, f"{path.name}: {err}"
        assert credential["subject"], path.name
        assert len(credential["fingerprint_sha256"]) == 95, path.name
        assert {c["status"] for c in credential["checks"]} <= {"ok", "warning", "error", "skipped"}, path.name

        code, out, err = run(capsys, "identity", "verify", "--cert", str(path), *anchors)
        assert code in (0, 1), f"{path.name}: {err}"
        assert "identity verification" in out, path.name
        assert "internal error" not in err, path.name


def corpus_report(capsys, corpus_dir: Path, leaf: str, *anchors: str, key: str = None) -> dict:
    argv = ["identity", "show", "--json", "--cert", str(corpus_dir / leaf)]
    for anchor in anchors:
        argv += ["--trust-anchor", str(corpus_dir / anchor)]
    if key:
        argv += ["--key", key]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    credential = json.loads(out)["credentials"][0]
    credential["status_of"] = {c["id"]: c["status"] for c in credential["checks"]}
    return credential


def test_corpus_rfc8995_pledge_with_key(corpus_dir, capsys, tmp_path):
    # The published test key is world-readable in the corpus; a private copy passes the mode check.
    key = tmp_path / "pledge.key"
    shutil.copyfile(corpus_dir / "rfc8995-C1.5-pledge-idevid-00-D0-E5-F2-00-02.testkey.pem", key)
    key.chmod(0o600)

    credential = corpus_report(
        capsys, corpus_dir, "rfc8995-C1.5-pledge-idevid-00-D0-E5-F2-00-02.pem",
        "rfc8995-C1.1-manufacturer-idevid-ca.pem", key=str(key),
    )

    assert credential["status_of"]["key-match"] == "ok"
    assert credential["status_of"]["chain"] == "ok"
    assert credential["status_of"]["time"] == "warning"
    assert credential["device_id"] == "00-D0-E5-F2-00-02"
    assert credential["masa_url"] == "highway-test.example.com:9443"


def test_corpus_same_name_masa_cas(corpus_dir, capsys):
    good = corpus_report(capsys, corpus_dir, "ot-registrar-iop14-pledge.pem", "ot-registrar-iop14-masa-ca.pem")
    other = corpus_report(capsys, corpus_dir, "ot-registrar-local-masa-pledge.pem", "ot-registrar-iop14-masa-ca.pem")

    assert good["status_of"]["chain"] == "ok"
    assert good["hardware_module_name"]["hw_serial"] == "OT-9527"
    assert other["status_of"]["chain"] == "error"
    chain_message = next(c["message"] for c in other["checks"] if c["id"] == "chain")
    assert "same name, different key" in chain_message


def test_corpus_utf8_masa_url_noted(corpus_dir, capsys):
    credential = corpus_report(
        capsys, corpus_dir, "anima-bootstrap-idevid-00-D0-E5-F2-00-02-2020.pem", "anima-bootstrap-vendor-ca-2019.pem",
    )

    assert credential["masa_url"] == "highway-test.example.com:9443"
    assert any("UTF8String" in note for note in credential["notes"])
    assert credential["status_of"]["chain"] == "ok"


def test_corpus_long_country_name_noted(corpus_dir, capsys):
    credential = corpus_report(capsys, corpus_dir, "anima-bootstrap-vendor-ca-2019.pem")

    assert "the issuer name contains an attribute value of 6 bytes where X.520 allows 2" in credential["notes"]
    assert credential["status_of"]["leaf"] == "error"
