"""Orchestrate the demo: PKI, broker, agent and a subscriber; clean up whatever was started."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_agent.devbroker import DevBroker, Observer
from edge_agent.devpki import create_dev_pki, make_ca

CONFIG_TEMPLATE = """\
# Demo configuration written by scripts/demo.
profile = "generic-linux"

[identity]
cert = "{cert}"
key = "{key}"
{tpm_settings}trust_anchors = ["{pki.manufacturer_ca}"]

[broker]
host = "127.0.0.1"
port = {port}
ca_file = "{pki.broker_ca}"
server_name = "localhost"
# The broker's key and a spare key held back for rotation.
pins = ["{pki.broker_pin}", "{pki.spare_pin}"]

[telemetry]
interval_s = {interval}
topic_prefix = "edge"

[spool]
path = "{work}/spool.db"

[reconnect]
min_delay_s = 0.5
max_delay_s = 10.0
"""


def summarise(payload: bytes) -> str:
    try:
        document = json.loads(payload)
    except ValueError:
        return payload[:60].decode(errors="replace")
    system = document.get("system", {})
    agent = document.get("agent", {})
    temperature = system.get("temperature_c")
    return (
        f"seq {document.get('seq')} at {document.get('ts')}: cpu {system.get('cpu_percent')}%, "
        f"mem {system.get('memory', {}).get('percent')}%, temp "
        f"{'n/a' if temperature is None else f'{temperature} C'}, queue {agent.get('queue_depth')}"
    )


def start_tpm_identity(work: Path, pki_dir: Path, manufacturer):
    """Start a software TPM in ``work`` and provision the demo device's IDevID key inside it."""
    from edge_agent.devtpm import SoftTpm, provision_tpm_idevid

    tpm = SoftTpm(work / "tpm").start()
    try:
        identity = provision_tpm_idevid(pki_dir, tpm, manufacturer, "GW-TPM-0001")
    except BaseException:
        tpm.stop()
        raise
    print(f"software TPM on 127.0.0.1:{tpm.port}: IDevID key {identity.key_path} is held by the TPM")
    return tpm, identity


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS", help="stop after this many seconds and print how many messages arrived")
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="telemetry interval (default: 2)")
    parser.add_argument("--work", type=Path, default=None, metavar="DIR", help="working folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--tpm", action="store_true", help="hold the IDevID key in a software TPM (swtpm behind tpm2-abrmd)")
    args = parser.parse_args()
    # `kill` and `timeout` send SIGTERM: clean up as for Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)

    work = args.work or Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    pki_dir = work / "pki"
    if pki_dir.exists():
        shutil.rmtree(pki_dir)
    # The manufacturer CA is kept so that it can also certify a key made in the TPM.
    manufacturer = make_ca("edge-agent development manufacturer CA")
    pki = create_dev_pki(pki_dir, manufacturer=manufacturer)
    print(f"development PKI in {pki_dir}: device {pki.device_serial}, broker pin {pki.broker_pin}")
    tpm, identity = start_tpm_identity(work, pki_dir, manufacturer) if args.tpm else (None, None)

    broker = DevBroker(work / "broker", pki.broker_cert, pki.broker_key, pki.manufacturer_ca).start()
    agent = None
    observer = None
    try:
        print(f"mosquitto listening with TLS on 127.0.0.1:{broker.port} (log: {broker.log_path})")
        config = work / "agent.toml"
        config.write_text(CONFIG_TEMPLATE.format(
            pki=pki, port=broker.port, work=work, interval=args.interval,
            cert=identity.cert_path if tpm else pki.idevid_cert,
            key=identity.key_path if tpm else pki.idevid_key,
            tpm_settings=f'key_source = "tpm"\ntpm_tcti = "{tpm.tcti}"\n' if tpm else "",
        ))

        observer = Observer(broker, pki.broker_ca, pki.observer_cert, pki.observer_key).start()
        command = [sys.executable, "-m", "edge_agent", "run", "--config", str(config)]
        print(f"starting: edge-agent run --config {config}")
        with open(work / "agent.log", "w") as agent_log:
            environment = {**os.environ, **tpm.environment} if tpm else None
            agent = subprocess.Popen(command, stdout=agent_log, stderr=subprocess.STDOUT, env=environment)

        shown = 0
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while deadline is None or time.monotonic() < deadline:
            if agent.poll() is not None:
                print(f"edge-agent exited with {agent.returncode}; see {work / 'agent.log'}")
                return 1
            messages = observer.received()
            for message in messages[shown:]:
                text = summarise(message.payload) if message.topic.endswith("/telemetry") else message.payload.decode(errors="replace")
                print(f"{message.topic}  {text}")
            shown = len(messages)
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
        time.sleep(0.3)
        count = len(observer.received("/telemetry")) if observer else 0
        if observer is not None:
            observer.stop()
        broker.stop()
        if tpm is not None:
            tpm.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{count} telemetry messages arrived at the broker")
    return 0 if count > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
