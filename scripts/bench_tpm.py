"""TLS handshake time with the IDevID key in a file and in a software TPM; see scripts/bench-tpm.

Each key is measured in its own child process, because the tpm2 provider is
configured per process, before OpenSSL starts. A child builds the agent's
own TLS context (pin check included) and times TCP connect plus handshake
against a local Mosquitto. Figures only, no pass/fail.

Nothing that imports ssl is imported at the top, so that the child can
configure OpenSSL first. Other benchmark scripts call ``bench_tpm_handshake``.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

TLS_VERSIONS = ("1.3", "1.2")


def child(config: Path, rounds: int) -> Dict[str, object]:
    """Time ``rounds`` handshakes with the agent's context for ``config``; run in a fresh interpreter."""
    started = time.perf_counter()
    from edge_agent.tpm_provider import prepare_process

    prepare_process(["--config", str(config)])
    import socket

    from edge_agent.config import load_config
    from edge_agent.identity import load_identity
    from edge_agent.tls import create_client_context

    settings = load_config(config)
    identity = load_identity(settings.identity, settings.device_id)
    context = create_client_context(settings.broker, identity)
    startup_s = time.perf_counter() - started

    def handshake() -> Tuple[float, str]:
        begin = time.perf_counter()
        with socket.create_connection((settings.broker.host, settings.broker.port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname=settings.broker.host) as tls:
                elapsed = time.perf_counter() - begin
                version = tls.version()
        return elapsed, version

    for _ in range(5):
        handshake()
    samples, versions = [], set()
    for _ in range(rounds):
        elapsed, version = handshake()
        samples.append(elapsed)
        versions.add(version)
    return {"samples": samples, "startup_s": startup_s, "versions": sorted(versions)}


def _run_child(config: Path, rounds: int, environment: Dict[str, str]) -> Dict[str, object]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(config), "--rounds", str(rounds)],
        capture_output=True, text=True, env=environment, timeout=600, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child for {config.name} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _write_config(path: Path, pki, port: int, cert: Path, key: Path, tpm_tcti: str = "") -> Path:
    tpm_lines = f'key_source = "tpm"\ntpm_tcti = "{tpm_tcti}"\n' if tpm_tcti else ""
    path.write_text(
        f'[identity]\ncert = "{cert}"\nkey = "{key}"\n{tpm_lines}trust_anchors = ["{pki.manufacturer_ca}"]\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\nca_file = "{pki.broker_ca}"\nserver_name = "localhost"\n'
        f'pins = ["{pki.broker_pin}", "{pki.spare_pin}"]\n[spool]\npath = "{path.parent / "spool.db"}"\n'
    )
    return path


def bench_tpm_handshake(rounds: int, key_kind: str = "ec-p256") -> Dict[str, object]:
    """Return median handshake times (ms) with a file key and a TPM-held key, per TLS version."""
    from edge_agent.devbroker import DevBroker
    from edge_agent.devpki import create_dev_pki, make_ca
    from edge_agent.devtpm import SoftTpm, provision_tpm_idevid

    folder = Path(tempfile.mkdtemp(prefix="edge-agent-bench-tpm-"))
    results: Dict[str, object] = {"tpm_key_kind": key_kind, "tpm_rounds": rounds}
    manufacturer = make_ca("edge-agent development manufacturer CA")
    pki = create_dev_pki(folder / "pki", key_kind=key_kind, manufacturer=manufacturer)
    tpm = SoftTpm(folder / "tpm").start()
    try:
        idevid = provision_tpm_idevid(folder / "pki", tpm, manufacturer, "GW-BENCH-0001", key_kind)
        environment = {**os.environ, **tpm.environment}
        for version in TLS_VERSIONS:
            options = {"tls_max_version": "1.2"} if version == "1.2" else {"tls_version": "tlsv1.3"}
            broker = DevBroker(folder / f"broker-{version}", pki.broker_cert, pki.broker_key, pki.manufacturer_ca, **options)
            # Per-connection log lines would make the broker's log the bottleneck.
            broker.extra_config = "log_type error\n"
            with broker:
                file_config = _write_config(folder / f"file-{version}.toml", pki, broker.port, pki.idevid_cert, pki.idevid_key)
                tpm_config = _write_config(
                    folder / f"tpm-{version}.toml", pki, broker.port, idevid.cert_path, idevid.key_path, tpm.tcti
                )
                results.update(_compare(version, file_config, tpm_config, rounds, environment))
    finally:
        tpm.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return results


def _compare(version: str, file_config: Path, tpm_config: Path, rounds: int, environment: Dict[str, str]) -> Dict[str, object]:
    # Two batches each, in ABBA order, so that drift in machine load hits both keys alike.
    half = max(1, rounds // 2)
    runs: Dict[str, List[Dict[str, object]]] = {"file": [], "tpm": []}
    for name in ("file", "tpm", "tpm", "file"):
        runs[name].append(_run_child(file_config if name == "file" else tpm_config, half, environment))

    figures: Dict[str, object] = {}
    label = version.replace(".", "")
    for name, batches in runs.items():
        samples = [sample for batch in batches for sample in batch["samples"]]
        negotiated = sorted({v for batch in batches for v in batch["versions"]})
        if negotiated != [f"TLSv{version}"]:
            raise RuntimeError(f"expected TLS {version} for the {name} key, negotiated {negotiated}")
        figures[f"tls{label}_{name}_key_ms"] = round(statistics.median(samples) * 1000, 2)
        figures[f"tls{label}_{name}_key_startup_ms"] = round(statistics.median(b["startup_s"] for b in batches) * 1000, 1)
    figures[f"tls{label}_tpm_ratio"] = round(figures[f"tls{label}_tpm_key_ms"] / figures[f"tls{label}_file_key_ms"], 2)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-tpm", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="handshakes per key and TLS version (default: 200)")
    parser.add_argument("--key-type", choices=("ec-p256", "ec-p384", "rsa-2048"), default="ec-p256",
                        help="key type of both IDevIDs (default: ec-p256)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.rounds)))
        return 0

    results: Dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
    }
    try:
        results.update(bench_tpm_handshake(args.rounds, args.key_type))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    width = max(len(key) for key in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
