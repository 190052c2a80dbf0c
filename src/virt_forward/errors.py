"""One exception hierarchy; every message names the bad value and where it came from."""

from __future__ import annotations

import enum
from pathlib import Path


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # something checked is wrong (doctor/status), or an unexpected error
    USAGE = 2  # argparse uses 2 as well
    CONFIG = 3
    FIREWALL = 4
    STATE = 5


class VirtForwardError(Exception):
    exit_code = ExitCode.FAILURE


class UsageError(VirtForwardError):
    exit_code = ExitCode.USAGE


class ConfigError(VirtForwardError):
    """A bad value in a config file: `file:line: key: message`."""

    exit_code = ExitCode.CONFIG

    def __init__(self, message: str, *, path: Path | str | None = None,
                 line: int | None = None, key: str | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        self.key = key
        self.reason = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.reason}"


class PortSpecError(ValueError):
    """Raised by the pure port-spec parser; config.py adds file/line/key to it."""


class FirewallError(VirtForwardError):
    exit_code = ExitCode.FIREWALL


class StateError(VirtForwardError):
    exit_code = ExitCode.STATE
