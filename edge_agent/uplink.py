"""The MQTT uplink: one pinned mutual-TLS session at a time, drained from the spool.

Every connection attempt builds a fresh paho client, so nothing from a dead
session lingers in memory: the spool is the only queue. A message leaves the
spool only when its PUBACK arrives. After a disconnect every unacknowledged
message is sent again, oldest first, so order is kept and delivery is at
least once.

Threads: the thread that calls ``connect``, ``pump`` and ``close`` (the main
loop) connects, notices lost sessions and closes. It also starts sending
after a connect, and when new messages arrive while nothing is in flight.
During a drain, paho's network thread does the rest from ``on_publish``. It
maps each PUBACK to its spool row, reads the next batch from the spool and
publishes it, and deletes acknowledged rows in batches.

The main loop is woken only when nothing is left in flight or when the spool
is due for a WAL checkpoint. It runs that checkpoint, so that its fsyncs do
not stall paho's thread. SQLite's own checkpoint still runs in the committing
thread if the main loop falls far behind. The main loop also deletes rows
acknowledged more than ``ACK_FLUSH_S`` ago. Keeping the per-message work in
one thread saves GIL hand-overs between the two threads. With that work in
the main loop, a drain reached about 0.7 of the rate of a bare paho loop
(``scripts/bench drain``).

The send state (packet id to row id map, acknowledged ids, last row sent) is
shared by both threads under one lock. Each paho client carries the number of
the session it was made for, and ``on_publish`` ignores PUBACKs of any other
session. So a late PUBACK of an old session can never delete a message sent
under the same packet id in a new one.
"""

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import BrokerConfig
from edge_agent.errors import SpoolError
from edge_agent.pinning import PinMismatchError
from edge_agent.spool import Spool
from edge_agent.telemetry import status_topic
from edge_agent.tlserrors import describe_tls_error

logger = logging.getLogger(__name__)

# paho keeps at most ``window`` messages unacknowledged on the wire. This many
# windows' worth are handed to it at once, so its network thread can send the
# next message the moment an acknowledgement frees a slot. They stay in the
# spool until acknowledged.
HANDOFF_WINDOWS = 10

# Acknowledged messages are deleted in batches: a delete lost in a crash only
# means the message is sent once more.
ACK_BATCH = 256
ACK_FLUSH_S = 0.2

# A session shorter than this is reported as a likely rejection by the broker.
SHORT_SESSION_S = 5.0


class _PahoNoiseFilter(logging.Filter):
    """Demote paho's "Client is not connected" error, which its loop logs when a clean disconnect races it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith("Client is not connected"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_paho_logger = logging.getLogger(__name__ + ".paho")
_paho_logger.addFilter(_PahoNoiseFilter())


@dataclass
class UplinkCounters:
    """Connection and delivery counters reported in telemetry."""

    connects: int = 0
    connect_failures: int = 0
    pin_failures: int = 0
    disconnects: int = 0
    published: int = 0
    acknowledged: int = 0
    rejected: int = 0
    unspooled: int = 0
    callback_errors: int = 0


class Uplink:
    """Connects to the broker and moves spooled messages to it under QoS 1."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        topic_prefix: str,
        spool: Spool,
        context_factory: Callable[[], ssl.SSLContext],
        window: int = 20,
        wake: Optional[threading.Event] = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.status_topic = status_topic(topic_prefix, client_id)
        self.spool = spool
        self.context_factory = context_factory
        self.window = window
        self.handoff = window * HANDOFF_WINDOWS
        self.wake = wake or threading.Event()
        self.counters = UplinkCounters()
        self.state = "disconnected"
        self.last_error: Optional[str] = None
        self.last_publish_ack: Optional[float] = None
        self.connected_since: Optional[float] = None
        self.last_session_s = 0.0

        # The hand-off is refilled once half of it is free: one spool query per batch.
        self._refill_at = self.handoff // 2

        self._client: Optional[mqtt.Client] = None
        self._session = 0
        self._connack = threading.Event()
        self._connack_code: Optional[mqtt.ReasonCode] = None
        self._lost = threading.Event()
        self._last_flush = time.monotonic()
        # The send state below is shared with paho's network thread and guarded by self._lock.
        # Lock order: paho's _out_message_mutex, then self._lock, then the spool's lock.
        self._lock = threading.Lock()
        # False while no session is up or while closing: on_publish then sends nothing new.
        self._sending = False
        self._inflight: Dict[int, int] = {}
        self._last_sent_id = 0
        self._acked_ids: List[int] = []

    # --- paho callbacks (network thread) ----------------------------------
    # on_connect and on_disconnect only record the event, and on_publish also
    # keeps the drain going. An exception is logged and swallowed, because one
    # escaping into paho would stop its network loop.

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if userdata != self._session:
                return
            self._connack_code = reason_code
            self._connack.set()
            self.wake.set()
        except Exception:
            self._callback_failed("on_connect")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if userdata != self._session:
                return
            self._lost.set()
            self._connack.set()
            self.wake.set()
            logger.debug("paho reported disconnect from %s: %s", self._peer, reason_code)
        except Exception:
            self._callback_failed("on_disconnect")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        try:
            # MQTT 5 PUBACKs carry a reason code; 3.1.1 ones are always a success.
            failure = str(reason_code) if reason_code is not None and reason_code.is_failure else None
            with self._lock:
                if userdata != self._session or not self._record_ack(mid, failure):
                    return
                if self._sending and len(self._inflight) <= self._refill_at:
                    self._send_batch(client)
                idle = not self._inflight
                flush = idle or len(self._acked_ids) >= ACK_BATCH
            if flush:
                self.flush_acks()
            # The main loop runs the spool's checkpoint, so its fsyncs do not stall this thread.
            if idle or (flush and self.spool.checkpoint_due):
                self.wake.set()
        except Exception:
            self._callback_failed("on_publish")

    def _record_ack(self, mid: int, failure: Optional[str]) -> bool:
        """Record the PUBACK of the spool message sent under ``mid``.

        Returns False when no spool message was sent under ``mid``, as for the status messages.
        """
        row_id = self._inflight.pop(mid, None)
        if row_id is None:
            return False
        if failure is not None:
            self._rejected(row_id, failure)
            return True
        self._acked_ids.append(row_id)
        self.counters.acknowledged += 1
        self.last_publish_ack = time.time()
        return True

    def _rejected(self, row_id: int, reason: str) -> None:
        # The broker did not take the message, so it stays in the spool and is
        # sent again after the next reconnect.
        self.counters.rejected += 1
        logger.warning(
            "broker %s rejected spool message %d (%s); it stays queued and is sent again after the next reconnect",
            self._peer, row_id, reason,
        )

    def _callback_failed(self, name: str) -> None:
        self.counters.callback_errors += 1
        logger.exception("error in paho callback %s for client %s; the client keeps running", name, self.client_id)

    @property
    def _peer(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    # --- connecting -------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        protocol = mqtt.MQTTv5 if self.broker.mqtt_version == "5" else mqtt.MQTTv311
        options = {} if protocol == mqtt.MQTTv5 else {"clean_session": True}
        # reconnect_on_failure=False: paho must never reconnect on its own. Every
        # attempt goes through connect(), after the backoff and the entropy check.
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            userdata=self._session,
            reconnect_on_failure=False,
            **options,
        )
        client.suppress_exceptions = True
        client.enable_logger(_paho_logger)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.tls_set_context(self.context_factory())
        # paho applies this to the TCP connect and to each read of the TLS handshake.
        client.connect_timeout = self.broker.handshake_timeout_s
        client.max_inflight_messages_set(self.window)
        client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        return client

    def connect(self) -> bool:
        """Make one connection attempt; return True once the broker accepted CONNECT.

        The TCP connect, TLS handshake and pin check run in this thread and are
        bounded by ``handshake_timeout_s``; the CONNACK wait by ``connack_timeout_s``.
        """
        self._session += 1
        self.state = "connecting"
        self._connack.clear()
        self._lost.clear()
        self._connack_code = None
        client = self._new_client()
        logger.info("connecting to %s as %s", self._peer, self.client_id)

        try:
            client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        except (TimeoutError, socket.timeout):
            # socket.timeout is an alias of TimeoutError from Python 3.10 on, a separate OSError on 3.9.
            return self._failed(
                client, f"timeout: TCP connect or TLS handshake timed out after {self.broker.handshake_timeout_s:g} s"
            )
        except OSError as exc:
            # ssl.SSLError and the pin check's PinMismatchError are OSErrors too.
            if isinstance(exc, PinMismatchError):
                self.counters.pin_failures += 1
            return self._failed(client, describe_tls_error(exc))
        except ValueError as exc:
            return self._failed(client, f"connection failed: {exc}")

        client.loop_start()
        if not self._connack.wait(self.broker.connack_timeout_s):
            return self._failed(client, f"no CONNACK within {self.broker.connack_timeout_s:g} s")
        code = self._connack_code
        if code is None or self._lost.is_set():
            return self._failed(client, "the broker closed the connection before CONNACK (client certificate or identity rejected?)")
        if code.is_failure:
            return self._failed(client, f"the broker refused CONNECT: {code}")

        self._client = client
        self.state = "connected"
        self.connected_since = time.monotonic()
        self.counters.connects += 1
        self.last_error = None
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        with self._lock:
            self._inflight.clear()
            self._last_sent_id = 0
            self._sending = True
        logger.info("connected to %s as %s", self._peer, self.client_id)
        return True

    def _failed(self, client: mqtt.Client, reason: str) -> bool:
        self.counters.connect_failures += 1
        self.last_error = reason
        self.state = "disconnected"
        logger.warning("connection to %s failed: %s", self._peer, reason)
        self._discard(client)
        return False

    @staticmethod
    def _discard(client: mqtt.Client) -> None:
        """Disconnect and stop paho's network thread; no callback of ``client`` runs afterwards."""
        try:
            client.disconnect()
        except (OSError, ValueError):
            pass
        client.loop_stop()

    # --- running ----------------------------------------------------------

    def pump(self) -> None:
        """Run a due spool checkpoint, notice a lost session, delete acknowledged messages and start sending new ones."""
        if self.spool.checkpoint_due:
            self.spool.checkpoint()
        if self.state != "connected":
            return
        if self._lost.is_set():
            self._handle_loss()
            return
        if self._flush_due():
            self.flush_acks()
        self._start_sending()

    def _flush_due(self) -> bool:
        pending = len(self._acked_ids)
        if not pending:
            return False
        due = time.monotonic() - self._last_flush >= ACK_FLUSH_S
        return pending >= ACK_BATCH or due or not self._inflight

    def flush_acks(self) -> None:
        """Delete the acknowledged messages from the spool."""
        with self._lock:
            acked, self._acked_ids = self._acked_ids, []
        self._last_flush = time.monotonic()
        if not acked:
            return
        try:
            self.spool.ack(acked)
        except SpoolError as exc:
            logger.warning("%d acknowledged messages stay in the spool and will be sent again: %s", len(acked), exc)

    def _start_sending(self) -> None:
        """Publish the next batch when too little is in flight for on_publish to do it.

        That is the case after a connect, and when messages arrive after
        everything sent was acknowledged.
        """
        client = self._client
        if client is None or len(self._inflight) > self._refill_at:
            return
        # paho 2.x runs on_publish for a PUBACK while holding its reentrant _out_message_mutex,
        # and on_publish takes self._lock. Taking both in that order here rules out a deadlock.
        # NOTE: _out_message_mutex is a private attribute (read in paho-mqtt 2.1.0 and 2.2; pinned below 3).
        with client._out_message_mutex:
            with self._lock:
                if self._sending:
                    self._send_batch(client)

    def _send_batch(self, client: mqtt.Client) -> None:
        """Read the next messages from the spool and publish them. The caller holds ``self._lock``.

        paho sends at most ``window`` of them at once and the rest as PUBACKs free slots.
        """
        free = self.handoff - len(self._inflight)
        if free <= 0:
            return
        try:
            messages = self.spool.peek(free, after_id=self._last_sent_id)
        except SpoolError as exc:
            logger.warning("cannot read queued messages to send to %s: %s", self._peer, exc)
            return
        for message in messages:
            info = client.publish(message.topic, message.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                logger.debug("publish of spool message %d deferred: %s", message.id, mqtt.error_string(info.rc))
                break
            self._inflight[info.mid] = message.id
            self._last_sent_id = message.id
            self.counters.published += 1

    def publish_unspooled(self, topic: str, payload: bytes) -> bool:
        """Send a message that is not in the spool once, at QoS 0, if a session is up.

        Returns True when paho took the message for sending. That is no
        delivery confirmation: QoS 0 has none, and the message is in memory only.
        """
        if self.state != "connected" or self._client is None or self._lost.is_set():
            return False
        info = self._client.publish(topic, payload, qos=0)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self.counters.unspooled += 1
        return True

    def _handle_loss(self) -> None:
        uptime = time.monotonic() - (self.connected_since or time.monotonic())
        hint = ""
        if uptime < SHORT_SESSION_S:
            hint = " (a session this short suggests another client with the same client id, or a broker that rejects this one)"
        logger.warning(
            "lost the connection to %s after %.1f s%s; %d messages in flight stay in the spool",
            self._peer, uptime, hint, len(self._inflight),
        )
        self.counters.disconnects += 1
        self.last_session_s = uptime
        self._teardown()

    def _teardown(self) -> None:
        client, self._client = self._client, None
        self.state = "disconnected"
        with self._lock:
            self._sending = False
        if client is not None:
            self._discard(client)
        # paho's thread has stopped: PUBACKs it reported until then still count.
        self.flush_acks()
        with self._lock:
            self._inflight.clear()
            self._last_sent_id = 0

    def reconfigure(self, broker: BrokerConfig, client_id: str, topic_prefix: str) -> None:
        """Take new broker settings; a live session is closed so the next handshake checks them."""
        self.broker = broker
        self.client_id = client_id
        self.status_topic = status_topic(topic_prefix, client_id)
        if self._client is not None:
            logger.info("closing the session to %s to apply the new configuration", self._peer)
            self._teardown()

    def close(self, timeout_s: float = 5.0) -> None:
        """Publish ``offline``, wait briefly for in-flight acknowledgements and disconnect."""
        if self._client is None:
            return
        client = self._client
        # Only the messages already in flight are awaited; no new ones are sent.
        with self._lock:
            self._sending = False
        if self.state == "connected" and not self._lost.is_set():
            deadline = time.monotonic() + timeout_s
            info = client.publish(self.status_topic, b"offline", qos=1, retain=True)
            while time.monotonic() < deadline and (self._inflight or not info.is_published()):
                if self._lost.is_set():
                    break
                self.wake.wait(0.05)
                self.wake.clear()
        self._teardown()
        logger.info("disconnected from %s", self._peer)
