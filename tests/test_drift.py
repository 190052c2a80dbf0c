"""The watcher repairs by the kind of each problem, never by parsing its text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from virt_forward import engine, watch
from virt_forward.drift import Kind, Problem

pytestmark = pytest.mark.noroot


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, found: list[Problem]) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(watch, "problems", lambda ctx, running: found)
    monkeypatch.setattr(watch.engine, "apply", lambda ctx, domain, xml: calls.append(("apply", domain)))
    monkeypatch.setattr(watch, "_repair_hairpin", lambda ctx, xmls: calls.append(("hairpin", sorted(xmls))))
    monkeypatch.setattr(watch, "reconcile", lambda ctx, running, xmls: calls.append(("reconcile", running)))
    monkeypatch.setattr(watch.metrics, "record_repair", lambda root: calls.append(("counted", None)))
    ctx = engine.Context(tmp_path / "etc", tmp_path / "run")
    assert watch.check_and_repair(ctx, running=["a"], xmls={"a": "<domain/>"}) == found
    return calls


def test_guests_waiting_for_an_address_are_applied_alone_by_name(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    # a name that looks like another problem's text must not matter
    odd = "web: hairpin mode off on its port vnet0"
    found = [Problem(Kind.WAITING, odd, "whatever the text says"), Problem(Kind.WAITING, "db", "db: waiting")]
    assert _run(monkeypatch, tmp_path, found) == [("apply", odd), ("apply", "db")]


def test_lost_hairpin_mode_alone_touches_no_firewall(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    found = [Problem(Kind.HAIRPIN, "web", "web: hairpin mode off on its port vnet0")]
    assert _run(monkeypatch, tmp_path, found) == [("hairpin", ["a"])]


def test_anything_else_reconciles_and_is_counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    found = [Problem(Kind.WAITING, "db", "db: waiting"), Problem(Kind.GUARD, "iptables FORWARD", "guard not on top")]
    assert _run(monkeypatch, tmp_path, found) == [("reconcile", ["a"]), ("counted", None)]
    assert _run(monkeypatch, tmp_path, []) == []
