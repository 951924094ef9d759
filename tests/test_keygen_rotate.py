"""``edge-agent keygen`` (spare keys for backup pins) and ``edge-agent pin rotate``."""

import json
import os
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge_agent.cli import main
from edge_agent.commands import keygen as keygen_command
from edge_agent.devpki import issue_server_cert, make_ca, new_key, write_certificates, write_private_key
from edge_agent.keys import KEY_TYPES
from edge_agent.pinning import Pin, pin_from_public_key


def run(capsys, *args: str):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- keygen -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_keygen_writes_private_key(kind, tmp_path, capsys):
    path = tmp_path / "spare.key"

    code, out, _ = run(capsys, "keygen", "--type", kind, str(path))

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert out.split()[0] == str(pin_from_public_key(key.public_key()))
    assert f"spare {kind.upper().replace('EC-P', 'EC P-').replace('RSA-', 'RSA ')} private key" in out


def test_keygen_pin_matches_openssl(tmp_path, capsys):
    path = tmp_path / "spare.key"
    _, out, _ = run(capsys, "keygen", "--type", "ec-p384", str(path))

    public = subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "der"],
                            capture_output=True, check=True).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-binary"], input=public, capture_output=True,
                            check=True).stdout

    assert out.split()[0] == str(Pin(digest))


def test_keygen_key_types_match_help():
    assert keygen_command.KEY_TYPES == KEY_TYPES


def test_keygen_never_overwrites(tmp_path, capsys):
    path = tmp_path / "spare.key"
    path.write_text("existing")

    code, _, err = run(capsys, "keygen", str(path))

    assert code == 1
    assert "already exists" in err
    assert path.read_text() == "existing"


def test_keygen_refuses_existing_csr_first(tmp_path, capsys):
    key_path = tmp_path / "spare.key"
    csr_path = tmp_path / "spare.csr"
    csr_path.write_text("existing")

    code, _, err = run(capsys, "keygen", "--csr", str(csr_path), "--subject", "CN=broker", str(key_path))

    assert code == 1
    assert "already exists" in err
    assert not key_path.exists()


def test_keygen_writes_csr(tmp_path, capsys):
    key_path = tmp_path / "spare.key"
    csr_path = tmp_path / "spare.csr"

    code, out, _ = run(
        capsys, "keygen", "--csr", str(csr_path), "--subject", "CN=broker.example.net,O=Example",
        "--san", "broker.example.net", "--san", "192.0.2.10", str(key_path),
    )

    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert code == 0
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=broker.example.net,O=Example"
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.net"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    assert str(pin_from_public_key(csr.public_key())) == out.split()[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--csr", "x.csr"], "--csr needs --subject"),
        (["--subject", "CN=broker"], "--subject and --san need --csr"),
    ],
)
def test_keygen_csr_options_checked(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["keygen", *args, str(tmp_path / "spare.key")])

    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_keygen_bad_subject(tmp_path, capsys):
    code, _, err = run(capsys, "keygen", "--csr", str(tmp_path / "x.csr"), "--subject", "broker", str(tmp_path / "k"))

    assert code == 1
    assert "invalid subject 'broker'" in err
    assert not (tmp_path / "k").exists()


def test_keygen_encrypts_with_passphrase(tmp_path, capsys):
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse\n")
    passphrase.chmod(0o600)
    path = tmp_path / "spare.key"

    code, out, _ = run(capsys, "keygen", "--passphrase-file", str(passphrase), str(path))

    key = serialization.load_pem_private_key(path.read_bytes(), password=b"correct horse")
    assert code == 0
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert out.split()[0] == str(pin_from_public_key(key.public_key()))


def test_keygen_empty_passphrase(tmp_path, capsys):
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("")
    passphrase.chmod(0o600)

    code, _, err = run(capsys, "keygen", "--passphrase-file", str(passphrase), str(tmp_path / "spare.key"))

    assert code == 1
    assert "passphrase is empty" in err
    assert not (tmp_path / "spare.key").exists()


def test_keygen_missing_folder(tmp_path, capsys):
    code, _, err = run(capsys, "keygen", str(tmp_path / "absent" / "spare.key"))

    assert code == 1
    assert "does not exist" in err


def test_keygen_json(tmp_path, capsys):
    path = tmp_path / "spare.key"

    _, out, _ = run(capsys, "keygen", "--format", "json", str(path))
    document = json.loads(out)

    assert document["key_file"] == str(path)
    assert document["key_type"] == "EC P-256"
    assert document["pin"].startswith("sha256//")


def test_keygen_ignores_umask(tmp_path, capsys):
    previous = os.umask(0)
    try:
        run(capsys, "keygen", str(tmp_path / "spare.key"))
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "spare.key").stat().st_mode) == 0o400


# --- rotate -------------------------------------------------------------------


@pytest.fixture
def rotation(tmp_path, write_config, pki):
    """A configuration pinned to the broker and spare keys, and the broker's next certificate."""
    ca = make_ca("rotation CA")
    next_key = new_key()
    next_cert = write_certificates(tmp_path / "next.pem", [issue_server_cert(ca, key=next_key).certificate])
    next_key_file = write_private_key(tmp_path / "next.key", next_key)
    return {
        "config": write_config(),
        "current": [pki.broker_pin, pki.spare_pin],
        "next_cert": next_cert,
        "next_key": next_key_file,
        "next_pin": pin_from_public_key(next_key.public_key()),
        "ca": ca,
    }


def rotate_json(capsys, *args: str) -> dict:
    code, out, err = run(capsys, "pin", "rotate", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_rotate_adds_new_pin(rotation, capsys):
    document = rotate_json(capsys, "--config", str(rotation["config"]), "--add", str(rotation["next_cert"]))

    assert document["pins"] == [str(p) for p in rotation["current"]] + [str(rotation["next_pin"])]
    assert document["added"] == [str(rotation["next_pin"])]
    assert document["changed"] is True


def test_rotate_accepts_key_csr_pin(rotation, tmp_path, capsys):
    csr = tmp_path / "next.csr"
    run(capsys, "keygen", "--csr", str(csr), "--subject", "CN=broker", str(tmp_path / "other.key"))
    csr_pin = str(pin_from_public_key(x509.load_pem_x509_csr(csr.read_bytes()).public_key()))

    document = rotate_json(
        capsys, "--config", str(rotation["config"]),
        "--add", str(rotation["next_key"]), "--add", str(csr), "--add", str(rotation["next_pin"]),
    )

    assert document["pins"][2:] == [str(rotation["next_pin"]), csr_pin]
    assert document["added"] == [str(rotation["next_pin"]), csr_pin]


def test_rotate_is_idempotent(rotation, tmp_path, capsys, write_config):
    first = rotate_json(capsys, "--config", str(rotation["config"]), "--add", str(rotation["next_cert"]))
    updated = write_config(name="updated.toml", broker={"pins": first["pins"]})

    second = rotate_json(capsys, "--config", str(updated), "--add", str(rotation["next_cert"]))

    assert second["pins"] == first["pins"]
    assert second["changed"] is False
    assert second["already_present"] == [str(rotation["next_pin"])]


def test_rotate_drop_after_switch(rotation, capsys):
    old = str(rotation["current"][0])

    document = rotate_json(
        capsys, "--config", str(rotation["config"]), "--add", str(rotation["next_cert"]), "--drop", old,
    )

    assert document["pins"] == [str(rotation["current"][1]), str(rotation["next_pin"])]
    assert document["dropped"] == [old]


def test_rotate_drop_absent_is_noop(rotation, capsys):
    absent = str(Pin(bytes(32)))

    document = rotate_json(capsys, "--config", str(rotation["config"]), "--drop", absent)

    assert document["pins"] == [str(p) for p in rotation["current"]]
    assert document["already_absent"] == [absent]
    assert document["changed"] is False


def test_rotate_refuses_fewer_than_two(rotation, capsys):
    code, out, err = run(capsys, "pin", "rotate", "--config", str(rotation["config"]),
                         "--drop", str(rotation["current"][0]))

    assert code == 1
    assert out == ""
    assert "would leave 1 pin(s)" in err
    assert "at least 2" in err


def test_rotate_refuses_add_and_drop(rotation, capsys):
    pin = str(rotation["next_pin"])

    code, _, err = run(capsys, "pin", "rotate", "--config", str(rotation["config"]), "--add", pin, "--drop", pin)

    assert code == 1
    assert "both --add and --drop" in err


def test_rotate_refuses_bundle(rotation, tmp_path, capsys):
    bundle = write_certificates(tmp_path / "bundle.pem", [
        x509.load_pem_x509_certificate(rotation["next_cert"].read_bytes()), rotation["ca"].certificate,
    ])

    code, _, err = run(capsys, "pin", "rotate", "--config", str(rotation["config"]), "--add", str(bundle))

    assert code == 1
    assert "contains 2 certificates or keys" in err


def test_rotate_toml_output_by_default(rotation, capsys):
    code, out, err = run(capsys, "pin", "rotate", "--config", str(rotation["config"]), "--add", str(rotation["next_cert"]))

    assert code == 0
    assert out.startswith('pins = ["sha256//')
    assert "added:" in err


def test_rotate_from_current_list(rotation, capsys):
    current = ";".join(str(p) for p in rotation["current"])

    document = rotate_json(capsys, "--current", current, "--add", str(rotation["next_pin"]))

    assert len(document["pins"]) == 3


def test_rotate_ignores_missing_identity_files(tmp_path, capsys):
    # The gateway's certificate and key paths need not exist where a pipeline runs.
    config = tmp_path / "fleet.toml"
    config.write_text('[broker]\nhost = "broker"\npins = ["%s", "%s"]\n' % (Pin(bytes(32)), Pin(bytes([1]) * 32)))

    document = rotate_json(capsys, "--config", str(config), "--add", str(Pin(bytes([2]) * 32)))

    assert len(document["pins"]) == 3


def test_rotate_reports_bad_configured_pin(tmp_path, capsys):
    config = tmp_path / "fleet.toml"
    config.write_text('[broker]\npins = ["sha256/abc", "%s"]\n' % Pin(bytes(32)))

    code, _, err = run(capsys, "pin", "rotate", "--config", str(config), "--add", str(Pin(bytes([2]) * 32)))

    assert code == 1
    assert f"{config}: broker.pins: pin list item 1" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["rotate", "--add", "x"], "exactly one of --config FILE or --current PINS"),
        (["rotate", "--current", "x"], "needs --add"),
        (["rotate", "extra.pem", "--current", "x", "--add", "y"], "takes no FILE arguments"),
        (["cert.pem", "--add", "x"], "belong to 'edge-agent pin rotate'"),
        (["cert.pem", "--ca-file", "x"], "belong to 'edge-agent pin --connect'"),
        (["rotate", "--connect", "h:1", "--current", "x", "--add", "y"], "cannot be combined"),
    ],
)
def test_pin_mode_options_checked(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["pin", *args])

    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_rotated_list_loads_as_config(rotation, write_config, capsys):
    from edge_agent.config import load_config

    document = rotate_json(capsys, "--config", str(rotation["config"]), "--add", str(rotation["next_cert"]))
    config = load_config(write_config(name="rolled.toml", broker={"pins": document["pins"]}))

    assert [str(p) for p in config.broker.pins] == document["pins"]


def test_rotate_subprocess(rotation, agent_command):
    result = subprocess.run(
        agent_command("pin", "rotate", "--config", str(rotation["config"]), "--add", str(rotation["next_cert"]), "--json"),
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["added"] == [str(rotation["next_pin"])]
