"""Results of ``edge-agent diagnose``: one record per check and the report that collects them."""

import enum
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


class Status(str, enum.Enum):
    """Outcome of one check, from best to worst; ``skipped`` always carries its reason."""

    OK = "ok"
    WARNING = "warning"
    ERROR = "error"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Detail:
    """A labelled value shown under a finding, such as one expected or observed pin."""

    label: str
    value: str
    note: str = ""

    def to_dict(self) -> Dict[str, str]:
        return {"label": self.label, "value": self.value, "note": self.note}


@dataclass(frozen=True)
class CheckResult:
    """The finding of one check and, unless it passed, the remedy for the technician."""

    id: str
    title: str
    status: Status
    finding: str
    remedy: str = ""
    failure_class: Optional[str] = None
    details: Tuple[Detail, ...] = ()
    duration_s: float = 0.0

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status.value,
            "finding": self.finding,
            "remedy": self.remedy or None,
            "class": self.failure_class,
            "details": [d.to_dict() for d in self.details],
            "duration_ms": round(self.duration_s * 1000),
        }


# Time limit of each network step unless the caller sets one.
DEFAULT_TIMEOUT_S = 5.0

EXIT_HEALTHY = 0
EXIT_FAILED = 1


@dataclass(frozen=True)
class Report:
    """All check results of one run, in the order they ran."""

    results: Tuple[CheckResult, ...]
    version: str
    generated_at: str
    config_path: str
    device_id: Optional[str] = None
    offline: bool = False

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status is status)

    def result(self, check_id: str) -> CheckResult:
        for candidate in self.results:
            if candidate.id == check_id:
                return candidate
        raise KeyError(check_id)

    @property
    def exit_code(self) -> int:
        """Return 1 when any check found an error; warnings and skips still exit 0."""
        return EXIT_FAILED if self.count(Status.ERROR) else EXIT_HEALTHY

    def summary(self) -> Dict[str, int]:
        return {status.value: self.count(status) for status in Status}

    def to_dict(self) -> dict:
        return {
            "schema": 1,
            "version": self.version,
            "generated_at": self.generated_at,
            "config": self.config_path,
            "device_id": self.device_id,
            "offline": self.offline,
            "summary": self.summary(),
            "exit_code": self.exit_code,
            "checks": [r.to_dict() for r in self.results],
        }
