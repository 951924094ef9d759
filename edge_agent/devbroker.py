"""A local Mosquitto over TLS for the demo, the tests and the benchmarks.

It is a development tool: it binds to loopback only and uses the
development PKI. Mosquitto 2.0 started as root drops to the ``mosquitto``
user before reading its key files, so the generated configuration keeps
the current user when that is root.
"""

import getpass
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.tpm_provider import OPENSSL_CONFIG, TCTI_ENV

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> Optional[str]:
    for candidate in MOSQUITTO_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class DevBroker:
    """One Mosquitto process with a TLS listener that requires client certificates."""

    folder: Path
    cert: Path
    key: Path
    client_ca: Path
    host: str = "127.0.0.1"
    port: int = 0
    # Mosquitto's tls_version is the minimum version; tls_max_version ("1.2")
    # caps it through an OpenSSL configuration for the broker process.
    tls_version: Optional[str] = None
    tls_max_version: Optional[str] = None
    extra_config: str = ""
    # Keep sessions and queued QoS 1 messages across restart(), as a production broker would.
    persistence: bool = False
    process: Optional[subprocess.Popen] = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)

    @property
    def log_path(self) -> Path:
        return self.folder / f"mosquitto-{self.port}.log"

    @property
    def config_path(self) -> Path:
        return self.folder / f"mosquitto-{self.port}.conf"

    def write_config(self) -> Path:
        lines = [
            f"listener {self.port} {self.host}",
            f"cafile {self.client_ca}",
            f"certfile {self.cert}",
            f"keyfile {self.key}",
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
            f"persistence {'true' if self.persistence else 'false'}",
            f"log_dest file {self.log_path}",
            "log_type all",
            "connection_messages true",
        ]
        if self.tls_version:
            lines.append(f"tls_version {self.tls_version}")
        if self.persistence:
            lines.append(f"persistence_location {self.folder}/")
            lines.append(f"persistence_file mosquitto-{self.port}.db")
        if os.geteuid() == 0:
            lines.insert(0, "user root")
        else:
            lines.insert(0, f"user {getpass.getuser()}")
        text = "\n".join(lines) + "\n" + self.extra_config
        self.config_path.write_text(text)
        return self.config_path

    def start(self, timeout_s: float = 10.0) -> "DevBroker":
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto not found; install it with 'apt-get install mosquitto'")
        self.write_config()
        self.process = subprocess.Popen(
            [binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self._environment(),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {error}{log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout_s} s")

    def _environment(self) -> "dict[str, str]":
        # The agent's TPM provider configuration must not reach the broker's OpenSSL;
        # any other OPENSSL_CONF of the caller is passed on.
        environment = dict(os.environ)
        environment.pop(TCTI_ENV, None)
        if environment.get("OPENSSL_CONF") == str(OPENSSL_CONFIG):
            del environment["OPENSSL_CONF"]
        if self.tls_max_version:
            openssl_conf = self.folder / f"openssl-{self.port}.cnf"
            openssl_conf.write_text(
                "openssl_conf = broker_init\n[broker_init]\nssl_conf = broker_ssl\n"
                "[broker_ssl]\nsystem_default = broker_tls\n"
                f"[broker_tls]\nMaxProtocol = TLSv{self.tls_max_version}\n"
            )
            environment["OPENSSL_CONF"] = str(openssl_conf)
        return environment

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "DevBroker":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class Observer:
    """A subscriber that records what arrives, as the cloud side would see it."""

    def __init__(self, broker: DevBroker, ca_file: Path, cert: Path, key: Path, topic: str = "#",
                 client_id: str = "observer", clean_session: bool = True) -> None:
        self.messages: List[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.topic = topic
        context = ssl.create_default_context(cafile=str(ca_file))
        context.load_cert_chain(str(cert), str(key))
        # clean_session=False with a persistent broker: messages published while the
        # observer reconnects are queued for it instead of lost.
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
        self.client.tls_set_context(context)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.reconnect_delay_set(0.1, 0.5)
        self.broker = broker

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append(message)

    def start(self, timeout_s: float = 10.0) -> "Observer":
        self.client.connect_async(self.broker.host, self.broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(timeout_s):
            raise RuntimeError("observer did not subscribe in time")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def received(self, topic_suffix: str = "") -> List[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(topic_suffix)]

    def wait_for(self, count: int, topic_suffix: str = "", timeout_s: float = 30.0) -> List[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.received(topic_suffix)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return self.received(topic_suffix)
