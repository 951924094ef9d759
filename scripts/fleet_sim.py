"""Fleet reconnect simulation; see scripts/fleet-sim. Prints figures, asserts nothing.

Starts a few hundred simulated gateways against one local Mosquitto. Each
gateway is a thread in one of a few worker processes and runs the agent's
own connection code: ``Uplink`` over a pinned mutual-TLS context, ``Backoff``
for the delays and a ``Spool`` of its own. Each has its own IDevID, issued by
a development manufacturer CA. The broker is then restarted on the same
port, and the script prints a histogram per second of the reconnect attempts
and of the sessions that were established again.
"""

import argparse
import json
import logging
import multiprocessing
import queue
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from edge_agent.backoff import Backoff
from edge_agent.config import BrokerConfig, IdentityConfig, ReconnectConfig
from edge_agent.devbroker import DevBroker, free_port
from edge_agent.devpki import issue_idevid, issue_server_cert, make_ca, new_key, write_certificates, write_private_key
from edge_agent.identity import load_identity
from edge_agent.pinning import pin_from_public_key
from edge_agent.spool import Spool
from edge_agent.tls import create_client_context
from edge_agent.uplink import Uplink

MAX_UPLINKS = 2000
MAX_OBSERVE_S = 600.0
# paho-mqtt 2.2 waits on its sockets with select(), which cannot watch a
# descriptor above 1023. Each uplink uses about six: its socket, paho's
# wake-up socket pair, and the spool's database, WAL and shared-memory files.
# So the gateways are spread over worker processes of at most this many each.
UPLINKS_PER_WORKER = 100
FDS_PER_UPLINK = 8


@dataclass(frozen=True)
class Event:
    """One connection attempt of one simulated gateway; ``at`` is CLOCK_MONOTONIC, shared by all processes."""

    at: float
    gateway: int
    connected: bool


@dataclass(frozen=True)
class FleetSettings:
    """Settings a worker process needs to run its share of the gateways."""

    folder: Path
    broker: BrokerConfig
    manufacturer_ca: Path
    reconnect: ReconnectConfig
    interval_s: float


class Gateway(threading.Thread):
    """The agent's reconnect loop for one simulated device: connect, drain, back off after a loss."""

    def __init__(self, index: int, settings: FleetSettings, events: List[Event], stop: threading.Event) -> None:
        super().__init__(name=f"gateway-{index}", daemon=True)
        self.index = index
        self.events = events
        self.stop_event = stop
        self.interval_s = settings.interval_s
        serial = device_serial(index)
        pki = settings.folder / "pki"
        identity = load_identity(IdentityConfig(pki / f"{serial}.pem", pki / f"{serial}.key", (settings.manufacturer_ca,)))
        self.spool = Spool(settings.folder / "spools" / f"{serial}.db", max_messages=1000, max_bytes=1 << 20)
        context = create_client_context(settings.broker, identity)
        self.uplink = Uplink(settings.broker, identity.device_id, "fleet", self.spool, lambda: context, window=5)
        self.backoff = Backoff(settings.reconnect)
        self.topic = f"fleet/{identity.device_id}/telemetry"

    def run(self) -> None:
        next_connect = 0.0
        next_sample = time.monotonic()
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= next_sample:
                self.spool.append(self.topic, json.dumps({"gateway": self.index, "ts": time.time()}).encode())
                next_sample = now + self.interval_s
            if self.uplink.state != "connected" and now >= next_connect:
                connected = self.uplink.connect()
                self.events.append(Event(now, self.index, connected))
                if not connected:
                    next_connect = time.monotonic() + self.backoff.next_delay()

            was_connected = self.uplink.state == "connected"
            self.uplink.pump()
            if was_connected and self.uplink.state != "connected":
                next_connect = time.monotonic() + self.backoff.after_session(self.uplink.last_session_s)
            self.uplink.wake.wait(0.1)
            self.uplink.wake.clear()
        self.uplink.close(timeout_s=1.0)
        self.spool.close()


def device_serial(index: int) -> str:
    return f"SIM-{index:05d}"


def run_worker(slot: int, indices: List[int], settings: FleetSettings, connected, stop, results) -> None:
    """Run gateways ``indices`` in this process until ``stop`` is set; report the attempts to ``results``."""
    logging.basicConfig(level=logging.CRITICAL)
    events: List[Event] = []
    local_stop = threading.Event()
    gateways = [Gateway(index, settings, events, local_stop) for index in indices]
    # Started over a second, as gateways that booted at different times would be.
    for gateway in gateways:
        gateway.start()
        time.sleep(1.0 / len(gateways))
    while not stop.wait(0.2):
        connected[slot] = sum(1 for gateway in gateways if gateway.uplink.state == "connected")
    local_stop.set()
    for gateway in gateways:
        gateway.join(timeout=10)
    results.put(list(events))


class Fleet:
    """A development PKI, one broker, and worker processes running ``count`` gateways with their own IDevIDs."""

    def __init__(self, folder: Path, count: int, reconnect: ReconnectConfig, interval_s: float) -> None:
        self.count = count
        manufacturer = make_ca("edge-agent fleet-sim manufacturer CA")
        broker_ca = make_ca("edge-agent fleet-sim broker CA")
        server = issue_server_cert(broker_ca)
        spare = new_key()
        pki = folder / "pki"
        pki.mkdir(mode=0o700)
        manufacturer_path = write_certificates(pki / "manufacturer-ca.pem", [manufacturer.certificate])
        for index in range(count):
            idevid = issue_idevid(manufacturer, device_serial(index))
            write_certificates(pki / f"{device_serial(index)}.pem", [idevid.certificate])
            write_private_key(pki / f"{device_serial(index)}.key", idevid.key)

        self.broker = DevBroker(
            folder / "broker",
            write_certificates(pki / "broker.pem", [server.certificate]),
            write_private_key(pki / "broker.key", server.key),
            manufacturer_path,
            port=free_port(),
        )
        broker_config = BrokerConfig(
            host="127.0.0.1", port=self.broker.port,
            ca_file=write_certificates(pki / "broker-ca.pem", [broker_ca.certificate]),
            server_name="localhost", pins=(server.pin, pin_from_public_key(spare.public_key())),
        )
        self.settings = FleetSettings(folder, broker_config, manufacturer_path, reconnect, interval_s)
        self._context = multiprocessing.get_context("fork")
        self._stop = self._context.Event()
        self._results = self._context.Queue()
        slices = [list(range(start, min(count, start + UPLINKS_PER_WORKER))) for start in range(0, count, UPLINKS_PER_WORKER)]
        self._connected = self._context.Array("i", len(slices))
        self.workers = [
            self._context.Process(target=run_worker, args=(slot, indices, self.settings, self._connected, self._stop, self._results))
            for slot, indices in enumerate(slices)
        ]

    def start(self) -> None:
        self.broker.start()
        for worker in self.workers:
            worker.start()

    def connected(self) -> int:
        return sum(self._connected[:])

    def wait_all_connected(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.connected() == self.count:
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> List[Event]:
        """Stop the workers and the broker; return every recorded attempt."""
        self._stop.set()
        events: List[Event] = []
        for _ in self.workers:
            try:
                events.extend(self._results.get(timeout=30))
            except queue.Empty:
                print("a worker process sent no results within 30 s", file=sys.stderr)
                break
        for worker in self.workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
        self.broker.stop()
        return events


def raise_fd_limit(count: int) -> None:
    """Raise the soft descriptor limit for the workers and for the broker, which needs one per uplink."""
    needed = max(count, min(count, UPLINKS_PER_WORKER) * FDS_PER_UPLINK) + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(
            f"error: {count} uplinks need about {needed} file descriptors but the hard limit is {hard}; "
            f"raise it (ulimit -Hn {needed} as root) or pass a smaller --uplinks"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def since(events: List[Event], origin: float) -> List[Event]:
    return sorted((Event(e.at - origin, e.gateway, e.connected) for e in events if e.at >= origin), key=lambda e: e.at)


def histogram(events: List[Event], observe_s: float) -> List[dict]:
    attempts = Counter(int(e.at) for e in events)
    sessions = Counter(int(e.at) for e in events if e.connected)
    return [{"second": s, "attempts": attempts.get(s, 0), "connected": sessions.get(s, 0)}
            for s in range(int(observe_s) + 1)]


def print_report(rows: List[dict], events: List[Event], count: int, restart_s: float) -> dict:
    width = max([row["attempts"] for row in rows] + [1])
    scale = min(1.0, 50 / width)
    print(f"\nreconnects after the broker restart ({restart_s:.2f} s down), per second since it stopped:")
    print("second  attempts  connected")
    for row in rows:
        bar = "#" * max(1 if row["connected"] else 0, round(row["connected"] * scale))
        print(f"{row['second']:6d}  {row['attempts']:8d}  {row['connected']:9d}  {bar}")

    first_success = {}
    for event in events:
        if event.connected and event.gateway not in first_success:
            first_success[event.gateway] = event.at
    times = sorted(first_success.values())
    busiest = max(rows, key=lambda row: row["connected"]) if rows else {"second": 0, "connected": 0}
    summary = {
        "uplinks": count,
        "reconnected": len(times),
        "attempts": len(events),
        "failed_attempts": sum(1 for e in events if not e.connected),
        "reconnect_p50_s": round(times[len(times) // 2], 2) if times else None,
        "reconnect_p90_s": round(times[int(len(times) * 0.9)], 2) if times else None,
        "reconnect_last_s": round(times[-1], 2) if times else None,
        "busiest_second": busiest["second"],
        "busiest_second_share": round(busiest["connected"] / max(1, len(times)), 3),
    }
    print(json.dumps(summary))
    return summary


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    defaults = ReconnectConfig()
    parser = argparse.ArgumentParser(
        prog="scripts/fleet-sim",
        description="Simulate a fleet of gateways reconnecting after a broker restart (loopback only).",
    )
    parser.add_argument("--uplinks", type=int, default=300, help=f"simulated gateways, 1 to {MAX_UPLINKS} (default: 300)")
    parser.add_argument("--observe", type=float, default=40.0, metavar="SECONDS",
                        help="how long to record reconnects after the broker stops (default: 40)")
    parser.add_argument("--down", type=float, default=0.0, metavar="SECONDS",
                        help="how long the broker stays stopped before it starts again (default: 0)")
    parser.add_argument("--min-delay", type=float, default=defaults.min_delay_s, metavar="SECONDS",
                        help=f"reconnect.min_delay_s, the first backoff cap (default: {defaults.min_delay_s:g})")
    parser.add_argument("--max-delay", type=float, default=defaults.max_delay_s, metavar="SECONDS",
                        help=f"reconnect.max_delay_s, the largest backoff cap (default: {defaults.max_delay_s:g})")
    parser.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                        help="seconds between telemetry messages per gateway (default: 5)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the PKI, spools and broker log (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="also print the histogram as one JSON line")
    args = parser.parse_args(argv)
    if not 1 <= args.uplinks <= MAX_UPLINKS:
        parser.error(f"--uplinks must be from 1 to {MAX_UPLINKS}, got {args.uplinks}")
    if not 1.0 <= args.observe <= MAX_OBSERVE_S:
        parser.error(f"--observe must be from 1 to {MAX_OBSERVE_S:g} seconds, got {args.observe:g}")
    if not 0.0 <= args.down <= args.observe:
        parser.error(f"--down must be from 0 to --observe ({args.observe:g}) seconds, got {args.down:g}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    raise_fd_limit(args.uplinks)
    reconnect = ReconnectConfig(min_delay_s=args.min_delay, max_delay_s=args.max_delay)
    folder = args.work or Path(tempfile.mkdtemp(prefix="edge-agent-fleet-"))
    folder.mkdir(parents=True, exist_ok=True)

    print(f"issuing {args.uplinks} IDevIDs in {folder}", flush=True)
    fleet = Fleet(folder, args.uplinks, reconnect, args.interval)
    fleet.start()
    events: List[Event] = []
    stopped_at = None
    restart_s = 0.0
    try:
        if not fleet.wait_all_connected(120.0):
            print(f"only {fleet.connected()} of {args.uplinks} uplinks connected within 120 s", file=sys.stderr)
            return 1
        print(f"{args.uplinks} uplinks in {len(fleet.workers)} processes connected to 127.0.0.1:{fleet.broker.port}; "
              "restarting the broker", flush=True)

        stopped_at = time.monotonic()
        fleet.broker.stop()
        time.sleep(args.down)
        fleet.broker.start()
        restart_s = time.monotonic() - stopped_at
        while time.monotonic() - stopped_at < args.observe:
            time.sleep(0.5)
    finally:
        events = fleet.stop()

    recent = since(events, stopped_at)
    rows = histogram(recent, args.observe)
    print_report(rows, recent, args.uplinks, restart_s)
    if args.json:
        print(json.dumps({"histogram": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
