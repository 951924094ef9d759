"""Checks that need no network: configuration, identity, clock, entropy, temperature, OpenSSL, pin-set."""

import ssl
from typing import List

from edge_agent import BUILD_DATE, pinning
from edge_agent.config import EntropyConfig, ThermalConfig, load_config
from edge_agent.diagnose import adapters
from edge_agent.diagnose.context import DiagnoseContext, labelled, ok, result, skipped
from edge_agent.diagnose.model import CheckResult, Detail, Status
from edge_agent.diagnose.render import format_utc, split_fix
from edge_agent.errors import ConfigError, EdgeAgentError

NO_CONFIG = "no usable configuration (see config)"


def check_config(ctx: DiagnoseContext) -> CheckResult:
    try:
        ctx.config = load_config(ctx.config_path)
    except ConfigError as exc:
        ctx.config = _load_without_file_checks(ctx)
        return _config_problems(exc.problems)
    except EdgeAgentError as exc:
        return result("config", Status.ERROR, str(exc), "Fix the file as the message says.")

    config = ctx.config
    ca_problem = _broker_ca_problem(config.broker.ca_file)
    if ca_problem is not None:
        return _config_problems([ca_problem])
    return ok("config", f"valid, with firmware profile {config.profile}", (Detail("profile", str(config.profile_path)),))


def _broker_ca_problem(ca_file) -> "str | None":
    """Return why OpenSSL cannot load the broker CA bundle, as 'edge-agent config check' would report it."""
    import ssl

    from edge_agent.tls import load_broker_ca

    try:
        load_broker_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ca_file)
    except ConfigError as exc:
        return exc.problems[0]
    return None


def _load_without_file_checks(ctx: DiagnoseContext):
    """Load the settings once more without file checks, so the identity checks can name the bad file."""
    try:
        return load_config(ctx.config_path, check_files=False)
    except EdgeAgentError:
        return None


def _config_problems(problems: List[str]) -> CheckResult:
    remedy = "Fix each setting as its message says, then run 'edge-agent config check'."
    if len(problems) == 1:
        problem, fix = split_fix(problems[0])
        return result("config", Status.ERROR, problem, f"{fix.rstrip('.')}. Then run 'edge-agent config check'." if fix else remedy)
    details = tuple(Detail("problem", line) for line in problems)
    return result("config", Status.ERROR, f"{len(problems)} problems in the configuration", remedy, details=details)


def check_clock(ctx: DiagnoseContext) -> CheckResult:
    problem = ctx.clock_problem()
    if problem is None:
        return ok("clock", f"{format_utc(ctx.now())}, after this release's build date {BUILD_DATE:%Y-%m-%d}")
    return result(
        "clock",
        Status.ERROR,
        problem,
        "Set the clock: check that NTP reaches its servers ('timedatectl status') or set it by hand "
        "('date -u -s ...'). Certificate dates are judged against this clock.",
    )


# --- identity ----------------------------------------------------------------


def _identity_step(ctx: DiagnoseContext, name: str) -> CheckResult:
    check_id = f"identity.{name}"
    outcome = ensure_identity(ctx)
    if outcome is None:
        return skipped(check_id, NO_CONFIG)
    step = outcome.step(name)
    status = Status(step.status)
    if status is Status.ERROR and not step.remedy:
        return result(check_id, status, step.finding, _IDENTITY_REMEDIES.get(name, "Fix the setting the message names."))
    return result(check_id, status, step.finding, step.remedy)


_IDENTITY_REMEDIES = {
    "selection": "Fix the failed identity checks above: without a usable credential the agent cannot connect.",
}


def ensure_identity(ctx: DiagnoseContext):
    """Validate the identity once per run; return the outcome, or None without a configuration."""
    if ctx.identity is None and ctx.config is not None:
        ctx.identity = adapters.validate_identity(ctx.config.identity, ctx.config.device_id, ctx.now())
    return ctx.identity


def identity_step_check(name: str):
    def check(ctx: DiagnoseContext) -> CheckResult:
        return _identity_step(ctx, name)

    check.__name__ = f"check_identity_{name.replace('-', '_')}"
    return check


def check_identity_tpm(ctx: DiagnoseContext) -> CheckResult:
    if ctx.config is None:
        return skipped("identity.tpm", NO_CONFIG)
    if ctx.config.identity.key_source != "tpm":
        return skipped("identity.tpm", "the device key is a file (identity.key_source = \"file\")")
    status = adapters.key_store_status(ctx.config.identity, ctx.timeout_s)
    if status.ok:
        return ok("identity.tpm", status.summary)
    return result(
        "identity.tpm", Status.ERROR, status.summary,
        "Check that the TPM resource manager runs (tpm2-abrmd, or the kernel's /dev/tpmrm0) and that "
        "identity.tpm_tcti names it; a key blob from another TPM cannot be used.",
    )


# --- hardware and platform -----------------------------------------------------


def check_entropy(ctx: DiagnoseContext) -> CheckResult:
    settings = ctx.config.entropy if ctx.config is not None else EntropyConfig()
    status = adapters.entropy_status(settings)
    ctx.crng_ready = status.crng_ready
    if status.ready:
        return ok("entropy", status.detail)
    return result(
        "entropy",
        Status.ERROR,
        f"{status.detail}; the agent delays every TLS handshake until it is ready",
        "Wait a few minutes after boot and check again. If it persists, enable the board's hardware RNG driver "
        "or an entropy daemon (rng-tools), and check entropy.min_entropy_bits.",
    )


def check_thermal(ctx: DiagnoseContext) -> CheckResult:
    settings = ctx.config.thermal if ctx.config is not None else ThermalConfig()
    snapshot = adapters.read_thermal(settings)
    thresholds = f"warm {snapshot.warm_c:g} C, hot {snapshot.hot_c:g} C, critical {snapshot.critical_c:g} C"
    if snapshot.temperature_c is None:
        return result(
            "thermal",
            Status.WARNING,
            "no temperature reading; the governor stays 'normal' and cannot slow work down when hot",
            "Check thermal.sysfs_files and thermal.sensors in the firmware profile for this board.",
            details=labelled("tried", snapshot.sources_tried),
        )

    finding = f"{snapshot.temperature_c:.1f} C, governor state {snapshot.state}"
    details = (Detail("source", str(snapshot.source)), Detail("limits", thresholds))
    if snapshot.state == "normal":
        return ok("thermal", finding, details)
    slowed = f"{finding}, periodic work slowed {snapshot.slowdown:g}x"
    remedy = "Check the enclosure's ventilation, the ambient temperature and the load on the gateway."
    status = Status.ERROR if snapshot.state == "critical" else Status.WARNING
    return result("thermal", status, slowed, remedy, details=details)


def check_openssl(ctx: DiagnoseContext) -> CheckResult:
    version = ssl.OPENSSL_VERSION
    available = [name for name, flag in (("TLS 1.2", ssl.HAS_TLSv1_2), ("TLS 1.3", ssl.HAS_TLSv1_3)) if flag]
    finding = f"{version}, {' and '.join(available) or 'no TLS 1.2 or 1.3'} available"
    minimum = ctx.config.broker.tls_min_version if ctx.config is not None else "1.2"

    if not ssl.HAS_TLSv1_2 or (minimum == "1.3" and not ssl.HAS_TLSv1_3):
        return result(
            "openssl", Status.ERROR, f"{finding}; broker.tls_min_version {minimum} cannot be met",
            "Install an OpenSSL build with TLS 1.2 and 1.3 (OpenSSL 3.0 or newer) and the Python linked to it.",
        )
    if ssl.OPENSSL_VERSION_INFO < (3, 0):
        return result(
            "openssl", Status.WARNING, f"{finding}; OpenSSL before 3.0 no longer receives security fixes",
            "Update the system's OpenSSL to 3.0 or newer.",
        )
    return ok("openssl", finding)


# --- pin-set -------------------------------------------------------------------


def check_pins_expiry(ctx: DiagnoseContext) -> CheckResult:
    if ctx.config is None:
        return skipped("pins.expiry", NO_CONFIG)
    broker = ctx.config.broker
    count = len(broker.pins)
    status = broker.pin_set.status(ctx.now().date())
    if status.days_left is None:
        return ok("pins.expiry", f"{count} pins, no expiry date set (broker.pins_expire)")

    days = status.days_left
    rotate = "Deploy a configuration with the new broker pins and a later broker.pins_expire."
    if status.state == pinning.EXPIRED:
        mode = (
            "pins are still enforced (pins_on_expiry = enforce)"
            if broker.pins_on_expiry == "enforce"
            else "only the CA chain and host name are checked now (pins_on_expiry = ca-only)"
        )
        return result("pins.expiry", Status.WARNING, f"the pin-set expired on {broker.pins_expire}; {mode}", rotate)
    if status.state == pinning.EXPIRING:
        return result(
            "pins.expiry", Status.WARNING, f"the pin-set expires in {days} days, on {broker.pins_expire}", rotate
        )
    return ok("pins.expiry", f"{count} pins, valid until {broker.pins_expire} ({days} days)")
