"""Checks of the running service: the telemetry spool and the agent's state file."""

import time
from typing import Optional

from edge_agent.agentstate import HEARTBEAT_S, AgentState, process_is_agent, read_agent_state, state_file_path
from edge_agent.diagnose import adapters
from edge_agent.diagnose.context import DiagnoseContext, ok, result, skipped
from edge_agent.diagnose.local_checks import NO_CONFIG
from edge_agent.diagnose.model import CheckResult, Detail, Status
from edge_agent.diagnose.render import format_duration, format_timestamp
from edge_agent.errors import EdgeAgentError
from edge_agent.telemetry import read_boot_id

# The spool is "nearly full" from this fraction of either bound.
SPOOL_FULL_WARNING = 0.8
# A backlog is stale when its oldest message waits longer than this many
# telemetry intervals, and at least STALE_BACKLOG_MIN_S.
STALE_BACKLOG_INTERVALS = 10
STALE_BACKLOG_MIN_S = 300.0
# A state file not rewritten for this long belongs to a hung or killed agent.
STATE_STALE_S = 3 * HEARTBEAT_S

RESTART_HINT = "Start it with 'systemctl start edge-agent' and read 'journalctl -u edge-agent -n 50' for the cause."


# --- spool ----------------------------------------------------------------------


def check_spool(ctx: DiagnoseContext) -> CheckResult:
    if ctx.config is None:
        return skipped("spool", NO_CONFIG)
    settings = ctx.config.spool
    try:
        stats = adapters.read_spool_stats(settings, time.time())
    except EdgeAgentError as exc:
        return result(
            "spool", Status.ERROR, str(exc),
            "Check the file's owner and mode, and free space on its file system ('df -h'). The agent moves a "
            "corrupt spool aside by itself when it starts.",
        )
    if stats is None:
        return result(
            "spool", Status.WARNING, f"no spool at {settings.path}: the agent has not stored telemetry with this configuration",
            "Start the agent ('systemctl start edge-agent'), or check that spool.path is the agent's spool.",
        )

    size = f"{stats.depth} messages, {stats.bytes / 1024:.1f} KiB"
    details = (
        Detail("limits", f"{settings.max_messages} messages, {settings.max_bytes / 1024:.0f} KiB ({settings.overflow})"),
    )
    problems = _spool_problems(ctx, stats)
    if stats.depth == 0:
        finding = "empty: the broker acknowledged every accepted message"
    else:
        finding = f"{size} waiting; the oldest for {format_duration(stats.oldest_age_s or 0.0)}"
    if stats.dropped_total:
        finding += f"; {stats.dropped_total} dropped so far because the spool was full"
    if stats.unstored_total:
        finding += f"; {stats.unstored_total} readings not stored because the spool was unavailable"
    if problems:
        return result("spool", Status.WARNING, finding, " ".join(problems), details=details)
    return ok("spool", finding, details)


def _spool_problems(ctx: DiagnoseContext, stats) -> list:
    settings = ctx.config.spool
    problems = []
    fill = max(stats.depth / settings.max_messages, stats.bytes / settings.max_bytes)
    if fill >= SPOOL_FULL_WARNING:
        problems.append(
            f"The spool is {fill:.0%} full; when full, {settings.overflow} discards telemetry. Restore the uplink."
        )
    stale_after = max(STALE_BACKLOG_MIN_S, STALE_BACKLOG_INTERVALS * ctx.config.telemetry.interval_s)
    if stats.oldest_age_s is not None and stats.oldest_age_s > stale_after:
        problems.append("Messages are not draining: fix the broker checks above, then watch the depth fall.")
    if stats.dropped_total:
        problems.append("Telemetry was lost to overflow; raise spool.max_bytes if the flash allows it.")
    if stats.unstored_total:
        problems.append("The spool could not be written at times: check free space ('df -h') and the agent's log.")
    return problems


# --- agent service -----------------------------------------------------------------


def ensure_agent_state(ctx: DiagnoseContext) -> Optional[AgentState]:
    """Read the state file once per run and decide whether the agent that wrote it still runs."""
    if ctx.agent_state_read or ctx.config is None:
        return ctx.agent_state
    ctx.agent_state_read = True
    try:
        ctx.agent_state = read_agent_state(state_file_path(ctx.config.spool.path))
    except ValueError as exc:
        ctx.agent_state_error = str(exc)
        return None
    state = ctx.agent_state
    ctx.agent_running = (
        state is not None
        and state.state != "stopped"
        and state.boot_id == read_boot_id()
        and process_is_agent(state.pid)
    )
    return state


def agent_holds_session(ctx: DiagnoseContext) -> bool:
    """Tell whether a running agent is connected, so a second CONNECT would take its session over."""
    state = ensure_agent_state(ctx)
    return bool(ctx.agent_running and state is not None and state.state == "connected" and _state_age_s(state) < STATE_STALE_S)


def _state_age_s(state: AgentState) -> float:
    if state.boot_id == read_boot_id():
        return max(0.0, time.monotonic() - state.updated_monotonic)
    return max(0.0, time.time() - state.updated)


def _ack_age_s(state: AgentState) -> Optional[float]:
    if state.last_publish_ack is None:
        return None
    if state.last_publish_ack_monotonic is not None and state.boot_id == read_boot_id():
        return max(0.0, time.monotonic() - state.last_publish_ack_monotonic)
    return max(0.0, time.time() - state.last_publish_ack)


def _last_publish_text(state: AgentState) -> str:
    age = _ack_age_s(state)
    if age is None:
        return "no publish acknowledged yet"
    return f"last publish acknowledged {format_duration(age)} ago ({format_timestamp(state.last_publish_ack)})"


def check_service(ctx: DiagnoseContext) -> CheckResult:
    if ctx.config is None:
        return skipped("service", NO_CONFIG)
    state = ensure_agent_state(ctx)
    path = state_file_path(ctx.config.spool.path)
    if ctx.agent_state_error:
        return result("service", Status.WARNING, f"unreadable state file: {ctx.agent_state_error}", RESTART_HINT)
    if state is None:
        return result(
            "service", Status.ERROR, f"the agent has not run with this configuration (no state file {path})", RESTART_HINT
        )

    details = (Detail("state", str(path)),)
    if not ctx.agent_running:
        return _not_running(state, details)
    return _running(ctx, state, details)


def _not_running(state: AgentState, details: tuple) -> CheckResult:
    since = format_timestamp(state.updated)
    ending = "stopped cleanly" if state.state == "stopped" else f"gone without a clean stop (last state {state.state})"
    finding = f"the agent is not running: {ending} at {since}; {_last_publish_text(state)}"
    if state.last_error:
        details += (Detail("error", state.last_error),)
    return result("service", Status.ERROR, finding, RESTART_HINT, details=details)


def _running(ctx: DiagnoseContext, state: AgentState, details: tuple) -> CheckResult:
    uptime = format_duration(max(0.0, time.time() - state.started))
    head = f"running (pid {state.pid}, up {uptime}), {state.state}; {_last_publish_text(state)}"
    if state.last_error:
        details += (Detail("error", state.last_error),)

    if _state_age_s(state) > STATE_STALE_S:
        return result(
            "service", Status.WARNING, f"{head}; the state file is {format_duration(_state_age_s(state))} old",
            "The agent may be hung: read 'journalctl -u edge-agent -n 50' and restart it ('systemctl restart edge-agent').",
            details=details,
        )
    if state.state != "connected":
        return result(
            "service", Status.WARNING, head,
            "The agent retries with backoff by itself: the broker checks above show why it cannot connect.",
            details=details,
        )
    ack_age = _ack_age_s(state)
    quiet_limit = max(120.0, 3 * ctx.config.telemetry.interval_s)
    if ack_age is not None and ack_age > quiet_limit:
        return result(
            "service", Status.WARNING, head,
            "Connected but nothing acknowledged lately: check the spool and the agent's log.", details=details,
        )
    return ok("service", head, details)
