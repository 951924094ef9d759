"""The uplink's connection discipline, against a real Mosquitto or a silent TCP server."""

import socket
import threading
import time

import pytest

from edge_agent.config import BrokerConfig, IdentityConfig
from edge_agent.devbroker import DevBroker
from edge_agent.identity import load_identity
from edge_agent.spool import Spool
from edge_agent.tls import create_client_context
from edge_agent.uplink import Uplink


@pytest.fixture
def identity(pki):
    return load_identity(IdentityConfig(pki.idevid_cert, pki.idevid_key, (pki.manufacturer_ca,)))


@pytest.fixture
def spool(tmp_path):
    instance = Spool(tmp_path / "spool.db")
    yield instance
    instance.close()


def broker_settings(pki, port: int, **overrides) -> BrokerConfig:
    values = dict(
        host="127.0.0.1", port=port, ca_file=pki.broker_ca, server_name="localhost",
        pins=(pki.broker_pin, pki.spare_pin), handshake_timeout_s=5.0, connack_timeout_s=5.0,
    )
    values.update(overrides)
    return BrokerConfig(**values)


def make_uplink(pki, identity, spool, port: int, wake=None, **overrides) -> Uplink:
    settings = broker_settings(pki, port, **overrides)
    context = create_client_context(settings, identity)
    return Uplink(settings, identity.device_id, "edge", spool, lambda: context, window=5, wake=wake)


def drain(uplink: Uplink, spool: Spool, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and spool.depth:
        uplink.pump()
        uplink.wake.wait(0.05)
        uplink.wake.clear()
    uplink.flush_acks()


class SilentServer:
    """A TCP server that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.sock.close()
        for connection in self.accepted:
            connection.close()


def test_silent_server_handshake_times_out(pki, identity, spool):
    server = SilentServer()
    try:
        uplink = make_uplink(pki, identity, spool, server.port, handshake_timeout_s=1.0)
        started = time.monotonic()
        connected = uplink.connect()
        elapsed = time.monotonic() - started
    finally:
        server.close()

    assert connected is False
    assert server.accepted
    assert elapsed < 10.0
    assert "timed out after 1 s" in uplink.last_error
    assert uplink.state == "disconnected"


class FlakyEvent(threading.Event):
    """A wake event whose first two ``set`` calls raise, as a bug in a callback would."""

    def __init__(self) -> None:
        super().__init__()
        self.failures_left = 2

    def set(self) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("injected callback failure")
        super().set()


def test_callback_exception_keeps_client(broker, pki, identity, spool, caplog):
    uplink = make_uplink(pki, identity, spool, broker.port, wake=FlakyEvent())
    for index in range(20):
        spool.append("edge/test/telemetry", f"m{index}".encode())

    assert uplink.connect()
    drain(uplink, spool)

    assert uplink.counters.callback_errors == 2
    assert "error in paho callback" in caplog.text
    assert uplink.state == "connected"
    assert spool.depth == 0
    uplink.close()


def test_stale_puback_keeps_message(broker, pki, identity, spool):
    uplink = make_uplink(pki, identity, spool, broker.port)
    assert uplink.connect()
    uplink.close()
    assert uplink.connect()
    row_id = spool.append("edge/test/telemetry", b"queued")
    with uplink._lock:
        uplink._inflight[7] = row_id
        uplink._last_sent_id = row_id

    # A PUBACK reported for the first session under a packet id that the second session reuses.
    uplink._on_publish(uplink._client, uplink._session - 1, 7, None, None)
    uplink.flush_acks()
    kept_ids = [m.id for m in spool.peek(10)]
    # The same packet id acknowledged in the current session.
    uplink._on_publish(uplink._client, uplink._session, 7, None, None)
    uplink.close()

    assert kept_ids == [row_id]
    assert spool.peek(10) == []
    assert uplink.counters.callback_errors == 0


def test_backlog_drains_in_order_while_appending(broker, observer, pki, identity, spool):
    # Window 5 makes a hand-off of 50, so most of this backlog is read and sent from on_publish.
    for index in range(300):
        spool.append("edge/test/telemetry", str(index).encode())
    uplink = make_uplink(pki, identity, spool, broker.port)
    assert uplink.connect()
    for index in range(300, 400):
        spool.append("edge/test/telemetry", str(index).encode())
        uplink.pump()
    drain(uplink, spool)
    received = observer.wait_for(400, "/telemetry")
    uplink.close()

    assert [int(m.payload) for m in received] == list(range(400))
    assert spool.depth == 0
    assert uplink.counters.acknowledged == 400
    assert uplink.counters.callback_errors == 0


def test_close_sends_no_new_batch(broker, pki, identity, spool):
    for index in range(2000):
        spool.append("edge/test/telemetry", str(index).encode())
    uplink = make_uplink(pki, identity, spool, broker.port)
    assert uplink.connect()
    uplink.pump()
    uplink.close()

    # Only what was handed to paho before close() was sent; every PUBACK deleted its message.
    assert uplink.counters.published < 2000
    assert spool.depth == 2000 - uplink.counters.acknowledged
    assert [int(m.payload) for m in spool.peek(1)] == [uplink.counters.acknowledged]


def test_paho_never_reconnects_alone(broker, pki, identity, spool):
    uplink = make_uplink(pki, identity, spool, broker.port)
    assert uplink.connect()

    broker.restart()
    # paho's own reconnect would have fired after its default 1 s delay.
    time.sleep(3.0)
    uplink.pump()

    assert broker.log().count(f"as {identity.device_id} (") == 1
    assert uplink.state == "disconnected"
    uplink.close()


def test_mqtt5_rejected_publish_stays_queued(tmp_path, pki, identity, spool, mosquitto_binary):
    acl = tmp_path / "acl"
    acl.write_text(f"user {identity.device_id}\ntopic write edge/{identity.device_id}/status\n")
    with DevBroker(tmp_path / "acl-broker", pki.broker_cert, pki.broker_key, pki.manufacturer_ca,
                   extra_config=f"acl_file {acl}\n") as acl_broker:
        uplink = make_uplink(pki, identity, spool, acl_broker.port, mqtt_version="5")
        row_id = spool.append(f"edge/{identity.device_id}/telemetry", b"not allowed")
        assert uplink.connect()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not uplink.counters.rejected:
            uplink.pump()
            time.sleep(0.05)
        uplink.close()

    assert uplink.counters.rejected == 1
    assert [m.id for m in spool.peek(10)] == [row_id]


def test_unspooled_publish_needs_session(pki, identity, spool):
    uplink = make_uplink(pki, identity, spool, 1)

    assert uplink.publish_unspooled("edge/test/telemetry", b"{}") is False
    assert uplink.counters.unspooled == 0
