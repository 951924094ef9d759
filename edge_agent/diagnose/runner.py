"""Runs the checks in order and collects the report."""

import dataclasses
import datetime
import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Tuple

from edge_agent import __version__
from edge_agent.errors import EdgeAgentError
from edge_agent.diagnose import adapters, local_checks, network_checks, service_checks
from edge_agent.diagnose.context import DiagnoseContext, result
from edge_agent.diagnose.model import DEFAULT_TIMEOUT_S, CheckResult, Report, Status

logger = logging.getLogger(__name__)

Check = Callable[[DiagnoseContext], CheckResult]

# The order a technician reads them in: what the gateway is, what it runs
# on, then the way to the broker step by step, then the service.
CHECKS: Tuple[Tuple[str, Check], ...] = (
    ("config", local_checks.check_config),
    ("clock", local_checks.check_clock),
    *((f"identity.{step}", local_checks.identity_step_check(step)) for step in adapters.IDENTITY_STEPS),
    ("identity.tpm", local_checks.check_identity_tpm),
    ("entropy", local_checks.check_entropy),
    ("thermal", local_checks.check_thermal),
    ("openssl", local_checks.check_openssl),
    ("pins.expiry", local_checks.check_pins_expiry),
    ("broker.resolve", network_checks.check_resolve),
    ("broker.tcp", network_checks.check_tcp),
    ("broker.tls", network_checks.check_tls),
    ("broker.pin", network_checks.check_pin),
    ("pins.backup", network_checks.check_backup_pin),
    ("broker.cert-expiry", network_checks.check_cert_expiry),
    ("mqtt.connect", network_checks.check_mqtt_connect),
    ("spool", service_checks.check_spool),
    ("service", service_checks.check_service),
)
CHECK_IDS = tuple(check_id for check_id, _ in CHECKS)

# Subsets that the serial console shows on their own.
GROUPS = {
    "identity": ("config", "clock") + tuple(i for i in CHECK_IDS if i.startswith("identity.")),
    "pins": ("config", "pins.expiry", "pins.backup"),
    "thermal": ("config", "thermal"),
    "status": ("config", "spool", "service"),
}


def run_group(config_path: Path, offline: bool, timeout_s: float, group: Optional[str] = None) -> Report:
    """Run the checks of one console group of ``GROUPS``, or all of them when ``group`` is None."""
    return run_diagnosis(config_path, offline=offline, timeout_s=timeout_s, only=None if group is None else GROUPS[group])


def run_diagnosis(
    config_path: Path,
    offline: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    only: Optional[Iterable[str]] = None,
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
) -> Report:
    """Run the checks (all, or those named in ``only``, in their usual order) and return the report."""
    wanted = set(CHECK_IDS if only is None else only)
    ctx = DiagnoseContext(config_path=Path(config_path), offline=offline, timeout_s=timeout_s, now=now)
    results = []
    try:
        for check_id, check in CHECKS:
            # The configuration check also loads the settings the others need.
            if check_id in wanted or check_id == "config":
                outcome = _run_one(ctx, check_id, check)
                if check_id in wanted:
                    results.append(outcome)
    finally:
        ctx.close()

    return Report(
        results=tuple(results),
        version=__version__,
        generated_at=now().astimezone(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        config_path=str(config_path),
        device_id=_device_id(ctx),
        offline=offline,
    )


def _device_id(ctx: DiagnoseContext) -> Optional[str]:
    if ctx.config is None:
        return None
    if ctx.config.device_id:
        return ctx.config.device_id
    if ctx.identity is not None:
        return ctx.identity.device_id
    return None


def _run_one(ctx: DiagnoseContext, check_id: str, check: Check) -> CheckResult:
    started = time.monotonic()
    try:
        outcome = check(ctx)
    except EdgeAgentError as exc:
        # Bad input (a CA file OpenSSL cannot load, say) is a finding with its own fix, not a bug.
        logger.info("diagnose check %s stopped on invalid input: %s", check_id, exc)
        outcome = result(check_id, Status.ERROR, str(exc), "Fix the file or setting named above, then run diagnose again.")
    except Exception as exc:  # one broken check must not hide the others
        logger.exception("diagnose check %s failed unexpectedly", check_id)
        outcome = result(
            check_id, Status.ERROR, f"the check itself failed: {type(exc).__name__}: {exc}",
            "This is a bug in edge-agent; please report it with this output.",
        )
    return dataclasses.replace(outcome, duration_s=time.monotonic() - started)
