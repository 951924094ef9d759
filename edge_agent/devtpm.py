"""A software TPM and a TPM-held development IDevID, for the demo, the tests and the benchmarks.

``SoftTpm`` runs swtpm (a TPM 2.0 simulator) on two loopback ports, a private
D-Bus session bus, and tpm2-abrmd as the resource manager in front of the
simulator. Clients reach it with the TCTI ``tabrmd:bus_type=session`` and the
bus address in ``environment``. The TPM state lives in the given folder, so a
key provisioned once loads again after a restart. Never for production.
"""

import argparse
import ctypes.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from cryptography import x509

from edge_agent.devbroker import free_port
from edge_agent.devpki import Issued, create_dev_pki, issue_idevid_from_csr, make_ca, write_certificates
from edge_agent.tpm_provider import TpmError, probe_provider, run_openssl

SOFT_TPM_TCTI = "tabrmd:bus_type=session"
# Debian packages that provide the tools below, for error messages.
SOFT_TPM_PACKAGES = "swtpm swtpm-tools tpm2-tools tpm2-openssl tpm2-abrmd libtss2-tcti-tabrmd0 dbus"
_TOOLS = {
    "swtpm": "swtpm",
    "dbus-daemon": "dbus",
    "tpm2-abrmd": "tpm2-abrmd",
    "openssl": "openssl",
}
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# openssl genpkey arguments for the key kinds a TPM 2.0 generates.
TPM_KEY_KINDS = {
    "ec-p256": ["-algorithm", "EC", "-pkeyopt", "group:P-256"],
    "ec-p384": ["-algorithm", "EC", "-pkeyopt", "group:P-384"],
    "rsa-2048": ["-algorithm", "RSA", "-pkeyopt", "bits:2048"],
}


def _find_tool(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN:
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_tools() -> List[str]:
    """Return what a software TPM lacks on this machine, each with the Debian package that provides it."""
    missing = [f"{name} (package {package})" for name, package in _TOOLS.items() if _find_tool(name) is None]
    if ctypes.util.find_library("tss2-tcti-tabrmd") is None:
        missing.append("libtss2-tcti-tabrmd (package libtss2-tcti-tabrmd0)")
    if _find_tool("openssl") is not None and not _provider_module_installed():
        missing.append("the tpm2 OpenSSL provider tpm2.so (package tpm2-openssl)")
    return missing


def _provider_module_installed() -> bool:
    folder = os.environ.get("OPENSSL_MODULES")
    if not folder:
        result = subprocess.run([_find_tool("openssl"), "version", "-m"], capture_output=True, text=True, check=False)
        match = re.search(r'MODULESDIR: "([^"]*)"', result.stdout)
        folder = match.group(1) if match else ""
    return bool(folder) and os.path.isfile(os.path.join(folder, "tpm2.so"))


def _free_port_pair() -> int:
    """Return a free loopback port whose successor is free too: swtpm's TCTI finds the control port at port + 1."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and _port_is_free(port + 1):
            return port
    raise RuntimeError("no two consecutive free loopback ports found for swtpm")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class SoftTpm:
    """swtpm behind tpm2-abrmd on a private D-Bus session bus; ``stop`` ends all three."""

    folder: Path
    port: int = 0
    bus_address: Optional[str] = None
    _swtpm: Optional[subprocess.Popen] = field(default=None, init=False, repr=False)
    _bus: Optional[subprocess.Popen] = field(default=None, init=False, repr=False)
    _abrmd: Optional[subprocess.Popen] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)

    @property
    def tcti(self) -> str:
        return SOFT_TPM_TCTI

    @property
    def environment(self) -> Dict[str, str]:
        """The variables a TPM client needs besides the TCTI: the private bus's address."""
        return {"DBUS_SESSION_BUS_ADDRESS": self.bus_address or ""}

    @property
    def state_dir(self) -> Path:
        return self.folder / "state"

    def start(self, timeout_s: float = 20.0) -> "SoftTpm":
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"software TPM tools missing: {', '.join(missing)}; run 'apt-get install {SOFT_TPM_PACKAGES}'")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        try:
            self.start_simulator()
            self._start_bus(timeout_s)
            self._start_resource_manager(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def start_simulator(self) -> None:
        """Start swtpm on two free loopback ports, or restart it from the saved state on the same ports."""
        if not self.port:
            self.port = _free_port_pair()
        log = self.folder / "swtpm.log"
        self._swtpm = subprocess.Popen(
            [
                _find_tool("swtpm"), "socket", "--tpm2",
                "--tpmstate", f"dir={self.state_dir}",
                "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                # A real TPM is started by the firmware; the simulator starts itself.
                "--flags", "not-need-init,startup-clear",
                "--log", f"file={log}",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self._wait_for_port(self.port, self._swtpm, "swtpm", 10.0)

    def stop_simulator(self) -> None:
        """Stop only swtpm, as if the TPM stopped responding; tpm2-abrmd keeps running."""
        _terminate(self._swtpm)
        self._swtpm = None

    def restart_resource_manager(self, timeout_s: float = 20.0) -> None:
        """Stop and start tpm2-abrmd, which drops every client's connection to the TPM."""
        _terminate(self._abrmd)
        self._start_resource_manager(timeout_s)

    def _start_bus(self, timeout_s: float) -> None:
        socket_path = self.folder / "bus"
        self.bus_address = f"unix:path={socket_path}"
        self._bus = subprocess.Popen(
            [_find_tool("dbus-daemon"), "--session", "--nofork", "--nopidfile", f"--address={self.bus_address}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while not socket_path.exists():
            if self._bus.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dbus-daemon did not create {socket_path}: {_stderr_of(self._bus)}")
            time.sleep(0.05)

    def _start_resource_manager(self, timeout_s: float) -> None:
        command = [_find_tool("tpm2-abrmd"), "--session", f"--tcti=swtpm:host=127.0.0.1,port={self.port}"]
        if os.geteuid() == 0:
            command.append("--allow-root")
        self._abrmd = subprocess.Popen(
            command, env={**os.environ, **self.environment}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while True:
            problem = probe_provider(self.tcti, timeout_s=5.0, extra_environment=self.environment)
            if problem is None:
                return
            if self._abrmd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tpm2-abrmd did not come up: {problem}; {_stderr_of(self._abrmd)}")
            time.sleep(0.1)

    def _wait_for_port(self, port: int, process: subprocess.Popen, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while _port_is_free(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port}: {_stderr_of(process)}")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in (self._abrmd, self._swtpm, self._bus):
            _terminate(process)
        self._abrmd = self._swtpm = self._bus = None

    def __enter__(self) -> "SoftTpm":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _terminate(process: Optional[subprocess.Popen]) -> None:
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr:
        process.stderr.close()


def _stderr_of(process: Optional[subprocess.Popen]) -> str:
    if process is None or process.poll() is None or process.stderr is None:
        return "still running"
    text = process.stderr.read().decode(errors="replace").strip()
    return f"exit status {process.returncode}: {text[-500:]}" if text else f"exit status {process.returncode}"


# --- provisioning -----------------------------------------------------------


@dataclass(frozen=True)
class TpmIdevid:
    """A TPM-held IDevID: the certificate file and the TSS2 key blob that only its TPM can use."""

    cert_path: Path
    key_path: Path
    certificate: x509.Certificate


def generate_tpm_key(key_path: Path, tpm: SoftTpm, key_kind: str = "ec-p256") -> Path:
    """Generate a key inside the TPM and write its TSS2 PRIVATE KEY blob with mode 0600; never overwrite."""
    if key_kind not in TPM_KEY_KINDS:
        raise ValueError(f"unknown TPM key kind {key_kind!r}; use one of {', '.join(TPM_KEY_KINDS)}")
    if key_path.exists():
        raise FileExistsError(17, "file exists", str(key_path))
    # The blob is wrapped by the TPM, but it is still kept private like any key file.
    previous = os.umask(0o077)
    try:
        arguments = ["genpkey", "-propquery", "provider=tpm2", *TPM_KEY_KINDS[key_kind], "-out", str(key_path)]
        result = run_openssl(arguments, tpm.tcti, extra_environment=tpm.environment)
    finally:
        os.umask(previous)
    if result.returncode != 0:
        raise TpmError("key-generation", f"openssl genpkey in the TPM failed: {result.stderr.decode(errors='replace').strip()}")
    os.chmod(key_path, 0o600)
    return key_path


def tpm_csr(key_path: Path, tpm: SoftTpm, serial_number: str) -> bytes:
    """Return a DER CSR signed inside the TPM by the key blob at ``key_path``."""
    subject = f"/O=edge-agent development/serialNumber={serial_number}/CN={serial_number}"
    arguments = ["req", "-new", "-key", str(key_path), "-subj", subject, "-outform", "DER"]
    result = run_openssl(arguments, tpm.tcti, extra_environment=tpm.environment)
    if result.returncode != 0:
        raise TpmError("csr", f"openssl req with the TPM key failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def provision_tpm_idevid(
    folder: Path, tpm: SoftTpm, manufacturer: Issued, serial_number: str, key_kind: str = "ec-p256"
) -> TpmIdevid:
    """Generate an IDevID key in the TPM and have ``manufacturer`` certify it from a CSR.

    Writes ``idevid-tpm.key`` (the TSS2 blob) and ``idevid-tpm.pem`` in ``folder``.
    """
    folder = Path(folder)
    key_path = generate_tpm_key(folder / "idevid-tpm.key", tpm, key_kind)
    certificate = issue_idevid_from_csr(manufacturer, tpm_csr(key_path, tpm, serial_number), serial_number)
    cert_path = write_certificates(folder / "idevid-tpm.pem", [certificate])
    return TpmIdevid(cert_path=cert_path, key_path=key_path, certificate=certificate)


# --- scripts/provision-tpm-idevid -------------------------------------------

AGENT_CONFIG_TEMPLATE = """\
# Written by scripts/provision-tpm-idevid: the IDevID key is held by the software TPM.
profile = "generic-linux"

[identity]
cert = "{idevid.cert_path}"
key = "{idevid.key_path}"
key_source = "tpm"
tpm_tcti = "{tcti}"
trust_anchors = ["{pki.manufacturer_ca}"]

[broker]
host = "127.0.0.1"
port = 8883
ca_file = "{pki.broker_ca}"
server_name = "localhost"
pins = ["{pki.broker_pin}", "{pki.spare_pin}"]

[spool]
path = "{folder}/spool.db"
"""


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/provision-tpm-idevid",
        description=(
            "Provision a TPM-held development IDevID on a software TPM: a development PKI, a key generated "
            "inside the TPM, and a certificate from the development manufacturer CA."
        ),
    )
    parser.add_argument("folder", type=Path, help="empty folder for the PKI, the TPM state and agent-tpm.toml")
    parser.add_argument("--serial", default="GW-TPM-0001", help="device serial number (default: GW-TPM-0001)")
    parser.add_argument("--key-type", choices=sorted(TPM_KEY_KINDS), default="ec-p256", help="TPM key type (default: ec-p256)")
    args = parser.parse_args(argv)

    folder = args.folder.resolve()
    if folder.exists() and any(folder.iterdir()):
        print(f"error: {folder} is not empty; choose an empty or new folder", file=sys.stderr)
        return 1
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    manufacturer = make_ca("edge-agent development manufacturer CA")
    pki = create_dev_pki(folder / "pki", manufacturer=manufacturer)
    try:
        with SoftTpm(folder / "tpm") as tpm:
            idevid = provision_tpm_idevid(folder / "pki", tpm, manufacturer, args.serial, args.key_type)
    except (RuntimeError, TpmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    config = folder / "agent-tpm.toml"
    config.write_text(AGENT_CONFIG_TEMPLATE.format(idevid=idevid, tcti=SOFT_TPM_TCTI, pki=pki, folder=folder))
    print(f"TPM-held IDevID for {args.serial}: certificate {idevid.cert_path}, key blob {idevid.key_path}")
    print(f"software TPM state: {folder / 'tpm' / 'state'} (the key blob loads only in this TPM)")
    print(f"agent configuration: {config} (set broker.port to your broker's port)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
