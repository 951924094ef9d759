"""The agent's main loop: sample telemetry into the spool, keep the uplink connected, drain.

One thread runs the loop; paho's network thread only hands acknowledgements
and connection events back through thread-safe queues and events.
"""

import dataclasses
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from edge_agent import __version__
from edge_agent.agentstate import AgentStateWriter, state_file_path
from edge_agent.backoff import Backoff
from edge_agent.config import AgentConfig, load_config
from edge_agent.entropy import EntropyGate
from edge_agent.errors import EdgeAgentError, SpoolError
from edge_agent.credential import load_credential_isolated
from edge_agent.sdnotify import Notifier
from edge_agent.spool import Spool, milliseconds_since_boot
from edge_agent.telemetry import SystemSampler, build_message, read_boot_id, telemetry_topic
from edge_agent.thermal import ThermalGovernor
from edge_agent.tls import create_client_context
from edge_agent.uplink import Uplink
from edge_agent.verify import Verifier

if TYPE_CHECKING:
    from edge_agent.tls import Credential

logger = logging.getLogger(__name__)

THERMAL_PERIOD_S = 10.0
# The loop wakes at least this often to notice signals and lost sessions.
MAX_IDLE_S = 1.0


@dataclass
class _Schedule:
    next_connect: float = 0.0
    next_sample: float = 0.0
    next_thermal: float = 0.0


class Agent:
    """Owns the spool, the uplink and the periodic jobs of one ``edge-agent run``."""

    def __init__(
        self, config: AgentConfig, identity: "Optional[Credential]" = None, notifier: Optional[Notifier] = None
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        # The validation runs in a child process, so that with a key file this process never loads cryptography.
        self.identity = identity or load_credential_isolated(config.identity, config.device_id)
        self.device_id = config.device_id or self.identity.device_id
        self.boot_id = read_boot_id()
        self.sequence_key = f"seq:{self.boot_id}"
        self.topic = telemetry_topic(config.telemetry.topic_prefix, self.device_id)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()

        self.spool = Spool(
            config.spool.path,
            max_messages=config.spool.max_messages,
            max_bytes=config.spool.max_bytes,
            overflow=config.spool.overflow,
            sequence_key=self.sequence_key,
            sequence_floor=milliseconds_since_boot,
        )
        self.entropy = EntropyGate(config.entropy)
        self.thermal = ThermalGovernor(config.thermal)
        self.verifier = Verifier(self.entropy, self.thermal, start=time.monotonic(), isolate=True)
        self.backoff = Backoff(config.reconnect)
        self.sampler = SystemSampler(disk_path=config.spool.path.parent)
        self._context = create_client_context(config.broker, self.identity)
        self.uplink = Uplink(
            config.broker,
            client_id=self.device_id,
            topic_prefix=config.telemetry.topic_prefix,
            spool=self.spool,
            context_factory=lambda: self._context,
            window=config.spool.inflight_window,
            wake=self.wake,
        )
        self._schedule = _Schedule()
        # Read by 'edge-agent diagnose' and the serial console in other processes.
        self.state_file = AgentStateWriter(
            state_file_path(config.spool.path), self.boot_id, self.device_id, f"{config.broker.host}:{config.broker.port}"
        )
        self.console = None

    # --- health -----------------------------------------------------------

    def health(self) -> dict:
        stats = self.spool.stats()
        return {
            "version": __version__,
            "connection": self.uplink.state,
            "queue_depth": stats.depth,
            "spool": stats.to_dict(),
            "pin_failures": self.uplink.counters.pin_failures,
            "connects": self.uplink.counters.connects,
            "connect_failures": self.uplink.counters.connect_failures,
            "disconnects": self.uplink.counters.disconnects,
            "last_error": self.uplink.last_error,
            "thermal": self.thermal.to_dict(),
            "entropy": self.entropy.to_dict(),
            "verification": self.verifier.to_dict(),
        }

    # --- jobs -------------------------------------------------------------

    def sample_telemetry(self) -> Optional[int]:
        """Take one reading and store it in the spool; return the message id once it is durable.

        A reading the spool cannot store is not accepted. It is counted in
        ``spool.unstored_total`` and, while connected, sent once at QoS 0 with
        ``seq`` null so that the broker still learns about the failure.
        """
        system = self.sampler.sample()
        thermal = self.thermal.to_dict()
        if thermal["available"]:
            system["temperature_c"] = thermal["temperature_c"]
        agent_health = self.health()

        def build(sequence: int) -> bytes:
            return build_message(self.device_id, self.boot_id, sequence, system, agent_health)

        try:
            return self.spool.append_sequenced(self.topic, build)
        except SpoolError as exc:
            logger.error("telemetry reading not stored; it is counted in spool.unstored_total: %s", exc)

        payload = build_message(self.device_id, self.boot_id, None, system, self.health())
        self.uplink.publish_unspooled(self.topic, payload)
        return None

    def try_connect(self, now: float) -> None:
        peer = f"{self.config.broker.host}:{self.config.broker.port}"
        admission = self.entropy.admit("connection", peer)
        if not admission.ready:
            # Not ready: ask again shortly, or after a full reconnect delay once this attempt is given up.
            delay = self._reconnect_delay() if admission.gave_up else admission.retry_in_s
            self._schedule.next_connect = now + delay
            return
        if self.uplink.connect():
            return
        if self.identity.key_source == "tpm":
            from edge_agent.tpm import refresh_tpm_context

            # A TPM restart leaves the key loaded into the old context unusable.
            self._context = refresh_tpm_context(self.config.broker, self.identity, self._context)
        delay = self._reconnect_delay()
        logger.info("next connection attempt to %s:%d in %.1f s", self.config.broker.host, self.config.broker.port, delay)
        self._schedule.next_connect = time.monotonic() + delay

    def _after_pump(self, was_connected: bool) -> None:
        if was_connected and self.uplink.state != "connected":
            delay = self.thermal.pace_reconnect(self.backoff.after_session(self.uplink.last_session_s))
            logger.info("reconnecting to %s:%d in %.1f s", self.config.broker.host, self.config.broker.port, delay)
            self._schedule.next_connect = time.monotonic() + delay

    def _reconnect_delay(self) -> float:
        # The thermal state only ever lengthens the delay; the next handshake is checked in full.
        return self.thermal.pace_reconnect(self.backoff.next_delay())

    # --- loop -------------------------------------------------------------

    def step(self, now: float) -> float:
        """Run whatever is due at ``now``; return the seconds until something is due again."""
        schedule = self._schedule
        if now >= schedule.next_thermal:
            self.thermal.update()
            schedule.next_thermal = now + THERMAL_PERIOD_S
        if self.uplink.state != "connected" and now >= schedule.next_connect:
            self.try_connect(now)
        if self.verifier.due(now):
            self.verifier.run(now, self.config, self._context)
        if now >= schedule.next_sample:
            self.sample_telemetry()
            schedule.next_sample = max(schedule.next_sample + self.config.telemetry.interval_s, now)

        was_connected = self.uplink.state == "connected"
        try:
            self.uplink.pump()
        except SpoolError as exc:
            logger.error("spool error while draining to %s: %s", self.config.broker.host, exc)
        self._after_pump(was_connected)
        self.state_file.update(self.uplink.state, self.uplink.last_publish_ack, self.uplink.last_error)

        due = [schedule.next_sample, schedule.next_thermal, self.verifier.next_due()]
        if self.uplink.state != "connected":
            due.append(schedule.next_connect)
        return max(0.0, min(min(due) - time.monotonic(), MAX_IDLE_S))

    def run(self, duration_s: Optional[float] = None) -> None:
        """Run until ``stop`` is called or ``duration_s`` passes."""
        logger.info(
            "edge-agent %s starting: device %s, broker %s:%d, spool %s (%d queued)",
            __version__, self.device_id, self.config.broker.host, self.config.broker.port,
            self.config.spool.path, self.spool.depth,
        )
        if self.config.serial.enabled:
            from edge_agent.console import start_service_console

            self.console = start_service_console(
                self.config.source, self.config.serial.port, self.config.serial.baud, self.health
            )
        end = None if duration_s is None else time.monotonic() + duration_s
        self._schedule = _Schedule(next_sample=time.monotonic())
        # Ready once configuration and identity are loaded: an offline gateway is still a working agent.
        self.notifier.ready(self.status_line())
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if end is not None and now >= end:
                    break
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload()
                # Cleared before the step, so an event that arrives during it still ends the wait below.
                self.wake.clear()
                timeout = self.step(now)
                # Reaching this line means the loop made progress, so the watchdog may be fed.
                self.notifier.watchdog()
                self.notifier.status(self.status_line())
                self.wake.wait(timeout)
        finally:
            self.shutdown()

    def status_line(self) -> str:
        thermal = self.thermal.to_dict()
        temperature = "n/a" if thermal["temperature_c"] is None else f"{thermal['temperature_c']} C"
        return (
            f"{self.uplink.state} to {self.config.broker.host}:{self.config.broker.port}; "
            f"thermal {thermal['state']} ({temperature}); spool {self.spool.depth} queued"
        )

    def stop(self, *_args) -> None:
        self.stopping.set()
        self.wake.set()

    def request_reload(self, *_args) -> None:
        self.reload_requested.set()
        self.wake.set()

    def reload(self) -> bool:
        """Apply a re-read configuration, or keep the running one when the new one is invalid.

        The spool stays open with its old settings: a new spool path or bound
        takes effect at the next restart. A live session is dropped so that
        the new pins and identity are checked by a fresh handshake.
        """
        source = self.config.source
        logger.info("reloading configuration from %s", source)
        self.notifier.reloading()
        try:
            config = load_config(source)
            identity = load_credential_isolated(config.identity, config.device_id)
            context = create_client_context(config.broker, identity)
        except EdgeAgentError as exc:
            logger.error("reload rejected, the running configuration stays in force: %s", exc)
            self.notifier.ready(self.status_line())
            return False

        if config.spool != self.config.spool:
            logger.warning("spool settings in %s changed; they take effect at the next restart", source)
            config = dataclasses.replace(config, spool=self.config.spool)
        self._apply(config, identity, context)
        logger.info("configuration reloaded from %s (device %s, broker %s:%d)", source, self.device_id, config.broker.host, config.broker.port)
        self.notifier.ready(self.status_line())
        return True

    def _apply(self, config: AgentConfig, identity: "Credential", context) -> None:
        self.config = config
        self.identity = identity
        self._context = context
        self.device_id = config.device_id or identity.device_id
        self.topic = telemetry_topic(config.telemetry.topic_prefix, self.device_id)
        self.thermal.settings = config.thermal
        self.thermal.reader.settings = config.thermal
        self.entropy.settings = config.entropy
        self.backoff.settings = config.reconnect
        self.uplink.reconfigure(config.broker, self.device_id, config.telemetry.topic_prefix)
        self._schedule.next_connect = time.monotonic()

    def shutdown(self) -> None:
        logger.info("edge-agent stopping: %d messages stay in the spool", self.spool.depth)
        self.notifier.stopping()
        if self.console is not None:
            self.console.stop()
        try:
            self.uplink.close()
        finally:
            self.state_file.stopped(self.uplink.last_publish_ack, self.uplink.last_error)
            self.spool.close()
            self.notifier.close()
        logger.info("edge-agent stopped")


def install_signal_handlers(agent: Agent) -> None:
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    signal.signal(signal.SIGHUP, agent.request_reload)
