"""Configuration loading, validation messages and firmware profiles."""

import os
import subprocess
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.config import find_profile, load_config, load_profile
from edge_agent.errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "firmware_profiles"


def problems_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_valid_config_loads(write_config, pki):
    config = load_config(write_config(8883))

    assert config.broker.port == 8883
    assert config.broker.tls_server_name == "localhost"
    assert len(config.broker.pins) == 2
    assert config.identity.cert == pki.idevid_cert
    assert config.profile == "generic-linux"
    assert config.thermal.warm_c == 70.0


def test_agent_file_overrides_profile(write_config):
    config = load_config(write_config(thermal={"warm_c": 60.0}, spool={"max_messages": 500}))

    assert config.thermal.warm_c == 60.0
    assert config.thermal.hot_c == 80.0
    assert config.spool.max_messages == 500


def test_unknown_key_is_named_with_hint(write_config):
    message = problems_of(write_config(broker={"pinz": ["x"]}))

    assert "agent.toml: broker.pinz: unknown key" in message
    assert "did you mean 'pins'?" in message


def test_unknown_section_is_rejected(tmp_path, write_config):
    path = write_config()
    path.write_text(path.read_text() + "\n[brokr]\nhost = 'x'\n")

    message = problems_of(path)

    assert "brokr: unknown key or section" in message
    assert "did you mean 'broker'?" in message


def test_single_pin_explains_lockout(write_config, pki):
    message = problems_of(write_config(broker={"pins": [str(pki.broker_pin)]}))

    assert "broker.pins: at least two distinct pins are required, got 1" in message
    assert "backup pin" in message
    assert "locks every gateway out" in message


def test_duplicate_pin_is_rejected(write_config, pki):
    message = problems_of(write_config(broker={"pins": [str(pki.broker_pin), str(pki.broker_pin)]}))

    assert "repeats item 1" in message


def test_bad_pin_names_canonical_form(write_config, pki):
    bad = str(pki.broker_pin).replace("sha256//", "sha256/")

    message = problems_of(write_config(broker={"pins": [bad, str(pki.spare_pin)]}))

    assert "single-slash" in message
    assert str(pki.broker_pin) in message


def test_missing_file_is_named(write_config, tmp_path):
    missing = tmp_path / "nope.pem"

    message = problems_of(write_config(broker={"ca_file": str(missing)}))

    assert f"broker.ca_file: file not found: {missing}" in message


def test_out_of_range_and_wrong_type(write_config):
    message = problems_of(write_config(broker={"port": 70000}, telemetry={"interval_s": "30"}))

    assert "broker.port: value 70000 is out of range; use a value from 1 to 65535" in message
    assert "telemetry.interval_s: expected a number, got a string '30'" in message


def test_bad_enum_lists_choices(write_config):
    message = problems_of(write_config(broker={"tls_min_version": "1.1"}))

    assert "broker.tls_min_version: invalid value '1.1'; use one of '1.2', '1.3'" in message


def test_key_readable_by_others_shows_chmod(write_config, tmp_path, pki):
    key = tmp_path / "open.key"
    key.write_bytes(pki.idevid_key.read_bytes())
    os.chmod(key, 0o644)

    message = problems_of(write_config(identity={"key": str(key)}))

    assert "identity.key" in message
    assert f"chmod 600 {key}" in message


def test_invalid_toml_names_line(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[broker]\nhost = \n")

    message = problems_of(path)

    assert str(path) in message
    assert "invalid TOML" in message
    assert "line 2" in message


def test_missing_config_file(tmp_path):
    message = problems_of(tmp_path / "absent.toml")

    assert "configuration file not found" in message


def test_unknown_profile_suggests(write_config):
    message = problems_of(write_config(top={"profile": "raspberry-pi4"}))

    assert "firmware profile 'raspberry-pi4' not found" in message
    assert "did you mean 'raspberry-pi-4'?" in message


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILE_DIR.glob("*.toml")))
def test_every_profile_is_valid(profile):
    path = find_profile(profile)
    data = load_profile(path)

    assert data["profile"]["name"] == profile
    assert data["thermal"]["warm_c"] < data["thermal"]["hot_c"] < data["thermal"]["critical_c"]


def test_profile_with_broker_section_is_rejected(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[profile]\nname = 'bad'\n[broker]\nhost = 'x'\n")

    with pytest.raises(ConfigError) as info:
        load_profile(path)

    assert "a firmware profile may not set this section" in str(info.value)


def test_profile_bad_value_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[profile]\nname = 'bad'\n[thermal]\nwarm_c = 'hot'\n")

    with pytest.raises(ConfigError) as info:
        load_profile(path)

    assert f"{path}: thermal.warm_c: expected a number" in str(info.value)


def test_config_check_prints_effective_settings(write_config, capsys, pki):
    code = main(["config", "check", "--config", str(write_config())])

    output = capsys.readouterr().out
    assert code == 0
    assert "is valid" in output
    assert f'broker.pins = ["{pki.broker_pin}"' in output
    assert f'device_id = "{pki.device_serial}"' in output
    assert "PRIVATE KEY" not in output


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"broker": {"pinz": []}}, "unknown key"),
        ({"broker": {"pins": ["sha256//AAAA"]}}, "base64 characters"),
        ({"identity": {"cert": "/nonexistent/idevid.pem"}}, "file not found"),
    ],
)
def test_config_check_errors_exit_nonzero(write_config, agent_command, sections, expected):
    result = subprocess.run(
        agent_command("config", "check", "--config", str(write_config(**sections))),
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_key_mode_exit_nonzero(write_config, agent_command, tmp_path, pki):
    key = tmp_path / "open.key"
    key.write_bytes(pki.idevid_key.read_bytes())
    os.chmod(key, 0o640)

    result = subprocess.run(
        agent_command("config", "check", "--config", str(write_config(identity={"key": str(key)}))),
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert f"chmod 600 {key}" in result.stderr
    assert "Traceback" not in result.stderr


def test_garbage_ca_bundle_is_named(write_config, agent_command, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")

    result = subprocess.run(
        agent_command("config", "check", "--config", str(write_config(broker={"ca_file": str(garbage)}))),
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert f"{garbage}: cannot load the CA file" in result.stderr
    assert "broker.ca_file" in result.stderr
    assert "internal error" not in result.stderr


def test_identity_error_names_config(write_config, agent_command, pki):
    config = write_config(identity={"key": str(pki.spare_broker_key)})

    result = subprocess.run(agent_command("config", "check", "--config", str(config)), capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert f"{config}: [identity]:" in result.stderr


def test_unknown_profile_names_config(write_config):
    path = write_config(top={"profile": "generic-linx"})

    message = problems_of(path)

    assert message.startswith(f"{path}: profile:")
