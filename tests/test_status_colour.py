"""status colours: only on a terminal, never with NO_COLOR."""

from __future__ import annotations

import io

import pytest

from virt_forward import commands


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colours_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr("sys.stdout", _Tty())
    paint = commands._painter()
    assert paint("live", "live") == "\033[32mlive\033[0m"
    assert paint("MISSING", "MISSING") == "\033[31;1mMISSING\033[0m"
    assert paint("-", "-") == "-"
    monkeypatch.setenv("NO_COLOR", "1")
    assert commands._painter()("live", "live") == "live"
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert commands._painter()("live", "live") == "live"
