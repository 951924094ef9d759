"""The tpm2 OpenSSL provider in this process: its configuration, the TCTI and bounded probes.

Python's ``ssl`` module initialises OpenSSL when it is first imported, and
OpenSSL reads ``OPENSSL_CONF`` only at that moment. ``prepare_process`` runs
first in ``edge-agent``'s ``main``: it reads ``[identity]`` of the
configuration file with ``tomllib`` and, when ``key_source = "tpm"``, points
OpenSSL at the agent's own configuration (``openssl-tpm2.cnf`` beside this
module) and the provider at ``identity.tpm_tcti``. The environment changes
only for this process and its children; the system-wide configuration is
never touched.

This module must not import ``ssl``, ``hashlib``, ``cryptography`` or any
module that does, because it runs before OpenSSL is initialised.
"""

import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.9 and 3.10 only
    import tomli as tomllib

from edge_agent.errors import IdentityError

logger = logging.getLogger(__name__)

OPENSSL_CONFIG = Path(__file__).resolve().with_name("openssl-tpm2.cnf")
# The provider reads its TCTI from this variable when OpenSSL loads it.
TCTI_ENV = "TPM2OPENSSL_TCTI"
DEFAULT_TCTI = "device:/dev/tpmrm0"
# The same default as edge_agent.config.DEFAULT_CONFIG_PATH, which cannot be
# imported here because edge_agent.config imports ssl.
DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
# Extension modules whose import initialises the system's OpenSSL, which then
# ignores a later OPENSSL_CONF. hashlib imports _hashlib.
OPENSSL_USERS = ("_ssl", "_hashlib")
# Time allowed for one openssl command against the TPM. A TPM that stops
# responding makes the command hang rather than fail, so every call is bounded.
PROBE_TIMEOUT_S = 10.0

# Causes named in TpmError.cause and TpmStatus.cause.
NO_OPENSSL = "no-openssl"
NO_PROVIDER = "no-provider"
NO_TPM = "no-tpm"
NO_RESOURCE_MANAGER = "no-resource-manager"
WRONG_BLOB = "wrong-blob"
WRONG_CERTIFICATE = "wrong-certificate"
UNSUPPORTED_KEY = "unsupported-key"
TIMEOUT = "timeout"
NOT_CONFIGURED = "openssl-not-configured"
PROVIDER_FAILED = "provider-failed"

_RESOURCE_MANAGER_FIX = (
    "use 'device:/dev/tpmrm0' (the kernel's resource manager) or 'tabrmd:' (tpm2-abrmd)"
)


class TpmError(IdentityError):
    """The TPM-held key cannot be used; ``cause`` is one of the cause constants of this module."""

    def __init__(self, cause: str, message: str, path: Optional[str] = None) -> None:
        self.cause = cause
        super().__init__(message, path, f"tpm-{cause}")


@dataclass(frozen=True)
class ProcessSetup:
    """The outcome of ``prepare_process`` for this process's OpenSSL."""

    requested: bool = False
    applied: bool = False
    config_path: Optional[Path] = None
    tcti: Optional[str] = None
    problem: Optional[TpmError] = None


_setup = ProcessSetup()


def process_setup() -> ProcessSetup:
    return _setup


def prepare_process(argv: Optional[Sequence[str]] = None) -> ProcessSetup:
    """Configure OpenSSL for a TPM-held key when the configuration file requests one.

    A TPM that does not respond is recorded in ``problem`` instead of raised,
    so that ``diagnose`` and ``identity show`` can still report it, and
    OpenSSL is then left unconfigured: loading a provider whose TPM hangs
    would hang the first ``import ssl``.
    """
    global _setup
    config_path = config_path_from_argv(sys.argv[1:] if argv is None else argv)
    identity = _read_identity_table(config_path)
    if identity.get("key_source") != "tpm":
        _setup = ProcessSetup(config_path=config_path)
        return _setup

    tcti = identity.get("tpm_tcti", DEFAULT_TCTI)
    if not isinstance(tcti, str) or not tcti.strip():
        # The configuration loader reports the invalid value with its fix.
        _setup = ProcessSetup(requested=True, config_path=config_path)
        return _setup
    tcti = tcti.strip()

    problem = _ssl_already_loaded_problem() or tcti_problem(tcti) or probe_provider(tcti)
    if problem is not None:
        _setup = ProcessSetup(requested=True, config_path=config_path, tcti=tcti, problem=problem)
        return _setup

    os.environ.update(openssl_environment(tcti))
    _setup = ProcessSetup(requested=True, applied=True, config_path=config_path, tcti=tcti)
    return _setup


def config_path_from_argv(argv: Sequence[str]) -> Path:
    """Return the ``--config``/``-c`` value of a command line, or the default path.

    A hand scan rather than argparse, because argparse exits the process on
    a malformed command line, which the real parser reports later anyway.
    """
    for index, argument in enumerate(argv):
        if argument == "--":
            break
        if argument in ("--config", "-c") and index + 1 < len(argv):
            return Path(argv[index + 1])
        if argument.startswith("--config="):
            return Path(argument.split("=", 1)[1])
        if argument.startswith("-c") and not argument.startswith("--") and len(argument) > 2:
            return Path(argument[2:])
    return DEFAULT_CONFIG_PATH


def _read_identity_table(path: Path) -> Mapping[str, object]:
    # Any error here is reported, with the file and the fix, by the full loader.
    try:
        with open(path, "rb") as handle:
            identity = tomllib.load(handle).get("identity", {})
    except (OSError, ValueError):
        return {}
    return identity if isinstance(identity, dict) else {}


def _ssl_already_loaded_problem() -> Optional[TpmError]:
    if not any(name in sys.modules for name in OPENSSL_USERS):
        return None
    return TpmError(
        NOT_CONFIGURED,
        "OpenSSL was initialised in this process before the TPM provider could be configured; "
        "start the agent with the 'edge-agent' command, which configures it first",
    )


def openssl_environment(tcti: str) -> Dict[str, str]:
    """Return the environment variables that give OpenSSL the tpm2 provider for ``tcti``."""
    environment = {"OPENSSL_CONF": str(OPENSSL_CONFIG), TCTI_ENV: tcti}
    # The TSS libraries print their own errors to stderr; the agent reports
    # the cause in its log instead. An operator's TSS2_LOG setting wins.
    environment["TSS2_LOG"] = os.environ.get("TSS2_LOG", "all+NONE")
    return environment


# --- the TCTI ---------------------------------------------------------------


def split_tcti(tcti: str) -> "tuple[str, str]":
    """Split ``name:configuration``; the TSS allows a bare name or a library file name."""
    name, _, configuration = tcti.partition(":")
    name = re.sub(r"^(lib)?tss2-tcti-|\.so(\.\d+)*$", "", name)
    return name, configuration


def resource_manager(tcti: str) -> Optional[str]:
    """Name the resource manager that ``tcti`` goes through, or None when it reaches the TPM directly."""
    name, configuration = split_tcti(tcti)
    if name == "tabrmd":
        return "tpm2-abrmd"
    if name == "device" and re.search(r"/tpmrm\d+$", configuration):
        return "kernel"
    return None


def tcti_problem(tcti: str) -> Optional[TpmError]:
    """Find what is wrong with ``tcti`` without talking to the TPM.

    Without a resource manager the provider runs out of TPM object slots in a
    TLS handshake ("out of memory for object contexts", TPM_RC_OBJECT_MEMORY),
    although a single signature in a fresh process still works.
    """
    name, configuration = split_tcti(tcti)
    if name == "device":
        device = configuration or "/dev/tpm0"
        if not re.search(r"/tpmrm\d+$", device):
            return TpmError(
                NO_RESOURCE_MANAGER,
                f"identity.tpm_tcti: '{tcti}' talks to the TPM without a resource manager, so TLS handshakes "
                f"fail with 'out of memory for object contexts'; {_RESOURCE_MANAGER_FIX}",
            )
        if not os.path.exists(device):
            return TpmError(
                NO_TPM,
                f"identity.tpm_tcti: TPM device {device} not found; check that the TPM is enabled in the "
                "firmware and its kernel driver is loaded ('ls /dev/tpm*')",
            )
        return None
    if name in ("swtpm", "mssim"):
        return TpmError(
            NO_RESOURCE_MANAGER,
            f"identity.tpm_tcti: '{tcti}' talks to a TPM simulator without a resource manager, so TLS "
            f"handshakes fail with 'out of memory for object contexts'; run tpm2-abrmd in front of it and "
            "use 'tabrmd:'",
        )
    # NOTE: other TCTIs (cmd:, libtpms:, vendor libraries) are passed to the
    # provider unchecked; only the probe shows whether they work.
    return None


# --- the openssl command ----------------------------------------------------


def run_openssl(
    arguments: List[str],
    tcti: str,
    timeout_s: float = PROBE_TIMEOUT_S,
    stdin: bytes = b"",
    extra_environment: Optional[Mapping[str, str]] = None,
) -> subprocess.CompletedProcess:
    """Run ``openssl`` with the agent's OpenSSL configuration and ``tcti``.

    Raises TpmError when the command is missing or does not finish within
    ``timeout_s`` seconds; any other failure is left to the caller.
    """
    binary = shutil.which("openssl")
    if binary is None:
        raise TpmError(
            NO_OPENSSL,
            "the openssl command is not installed, and the TPM self-test needs it; install the 'openssl' package",
        )
    environment = {**os.environ, **(extra_environment or {}), **openssl_environment(tcti)}
    try:
        return subprocess.run(
            [binary, *arguments], input=stdin, capture_output=True, env=environment, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise TpmError(
            TIMEOUT,
            f"the TPM (TCTI '{tcti}') did not respond to 'openssl {arguments[0]}' within {timeout_s:.0f} s; "
            "check the TPM and its resource manager",
        ) from None


def probe_provider(
    tcti: str, timeout_s: float = PROBE_TIMEOUT_S, extra_environment: Optional[Mapping[str, str]] = None
) -> Optional[TpmError]:
    """Load the tpm2 provider in a child ``openssl``; return the cause when the TPM does not respond.

    Loading the provider opens the TCTI and queries the TPM, so success means
    the TPM responds. The explicit ``-provider tpm2`` makes OpenSSL print the
    provider's error, which a failure inside the configuration file hides.
    """
    try:
        arguments = ["list", "-providers", "-provider", "tpm2", "-provider", "default"]
        result = run_openssl(arguments, tcti, timeout_s, extra_environment=extra_environment)
    except TpmError as exc:
        return exc
    if result.returncode == 0 and b"tpm2" in result.stdout:
        return None
    return classify_provider_failure(result.stderr.decode(errors="replace"), tcti)


def classify_provider_failure(stderr: str, tcti: str) -> TpmError:
    """Name the cause of a failed provider load from the errors that openssl printed."""
    detail = openssl_error_summary(stderr)
    if "could not load the shared library" in stderr:
        return TpmError(
            NO_PROVIDER,
            f"the tpm2 OpenSSL provider is not installed ({detail}); install the 'tpm2-openssl' package",
        )
    name, _ = split_tcti(tcti)
    if name == "tabrmd" and "connect to next lower layer" in stderr:
        return TpmError(
            NO_RESOURCE_MANAGER,
            f"the TPM resource manager tpm2-abrmd is not reachable on D-Bus (TCTI '{tcti}': {detail}); "
            "start tpm2-abrmd, or use 'device:/dev/tpmrm0' for the kernel's resource manager",
        )
    return TpmError(
        NO_TPM,
        f"the TPM did not respond (TCTI '{tcti}': {detail}); check that the TPM is present and "
        "identity.tpm_tcti names it",
    )


def openssl_error_summary(stderr: str) -> str:
    """Return the first OpenSSL error line of ``stderr`` as ``reason: detail``.

    OpenSSL 3 prints ``<thread>:error:<code>:<library>:<function>:<reason>:<file>:<line>:<detail>``.
    The first line is the most specific one, such as the provider's "tcti:IO failure".
    """
    for line in stderr.splitlines():
        parts = line.strip().split(":", 8)
        if len(parts) != 9 or parts[1] != "error":
            continue
        reason = "" if re.fullmatch(r"reason\(\d+\)", parts[5]) else parts[5]
        # The TSS puts its numeric response code before the text.
        detail = re.sub(r"^\d+ ", "", parts[8]).strip()
        return ": ".join(part for part in (reason, detail) if part)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"
