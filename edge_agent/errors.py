"""Exception tree of edge-agent.

Every error that reaches the command line is an ``EdgeAgentError``: the CLI
prints its message on one line and exits non-zero, without a traceback.
"""

from typing import Optional


class EdgeAgentError(Exception):
    """Base class of the errors that edge-agent raises on bad input or state."""


class ConfigError(EdgeAgentError):
    """One or more invalid settings in a configuration or firmware profile.

    ``problems`` contains one line per invalid setting, each naming the file,
    the key, the value and the fix.
    """

    def __init__(self, problems: "list[str]") -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class IdentityError(EdgeAgentError):
    """The device certificate or key cannot be loaded or used."""

    def __init__(self, message: str, path: Optional[str] = None, check: Optional[str] = None) -> None:
        self.path = path
        self.check = check
        super().__init__(message)


class PinSyntaxError(EdgeAgentError, ValueError):
    """A pin string that is not ``sha256//<base64 of 32 bytes>``."""


class SpoolError(EdgeAgentError):
    """The spool database cannot be opened or written."""
