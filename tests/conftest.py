"""Shared fixtures: a development PKI, a real Mosquitto over TLS, agent configuration files."""

import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from edge_agent.devbroker import DevBroker, Observer, find_mosquitto
from edge_agent.devpki import DevPki, create_dev_pki

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT.parent / "shared" / "idevid-corpus"


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> DevPki:
    return create_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("mosquitto is not installed; run scripts/test, which installs it, or 'apt-get install mosquitto'")
    return binary


@pytest.fixture
def broker(pki: DevPki, tmp_path: Path, mosquitto_binary: str) -> Iterator[DevBroker]:
    instance = DevBroker(tmp_path / "broker", pki.broker_cert, pki.broker_key, pki.manufacturer_ca)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def observer(broker: DevBroker, pki: DevPki) -> Iterator[Observer]:
    subscriber = Observer(broker, pki.broker_ca, pki.observer_cert, pki.observer_key).start()
    yield subscriber
    subscriber.stop()


def render_config(pki: DevPki, port: int, spool_path: Path, **sections: dict) -> str:
    """Return an agent configuration as TOML; ``sections`` override or add keys per section."""
    settings = {
        "identity": {
            "cert": str(pki.idevid_cert),
            "key": str(pki.idevid_key),
            "trust_anchors": [str(pki.manufacturer_ca)],
        },
        "broker": {
            "host": "127.0.0.1",
            "port": port,
            "ca_file": str(pki.broker_ca),
            "server_name": "localhost",
            "pins": [str(pki.broker_pin), str(pki.spare_pin)],
            "handshake_timeout_s": 5.0,
        },
        "telemetry": {"interval_s": 0.5},
        "spool": {"path": str(spool_path)},
        "reconnect": {"min_delay_s": 0.2, "max_delay_s": 2.0},
    }
    top = sections.pop("top", {})
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)

    lines = [f"{key} = {_toml_value(value)}" for key, value in top.items()]
    for name, values in settings.items():
        lines.append(f"\n[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None)
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture
def write_config(tmp_path: Path, pki: DevPki) -> Callable[..., Path]:
    """Write an agent configuration for ``port`` (default: no broker) and return its path."""

    def write(port: int = 1, name: str = "agent.toml", **sections: dict) -> Path:
        path = tmp_path / name
        path.write_text(render_config(pki, port, tmp_path / "spool.db", **sections))
        return path

    return write


@pytest.fixture
def agent_command() -> Callable[..., list]:
    """Return the argv that runs the installed agent in a fresh interpreter."""

    def command(*args: str) -> list:
        return [sys.executable, "-m", "edge_agent", *args]

    return command


@pytest.fixture
def corpus_dir() -> Path:
    if not CORPUS_DIR.is_dir():
        pytest.skip(f"IDevID corpus not found at {CORPUS_DIR}; it is provided beside the repository checkout")
    return CORPUS_DIR


@pytest.fixture(autouse=True)
def _no_debug_tracebacks(monkeypatch) -> None:
    monkeypatch.delenv("EDGE_AGENT_DEBUG", raising=False)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    os.environ.pop("NOTIFY_SOCKET", None)
