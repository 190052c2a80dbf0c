"""Without conntrack(8) the hook says once per guest that stale flows will be kept (issue 19, item 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_forward import engine
from virt_forward.state import StateStore

pytestmark = pytest.mark.noroot


def test_told_once_per_guest_and_not_at_all_with_conntrack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = StateStore(tmp_path)
    monkeypatch.setattr(engine, "which", lambda name: None)
    for _ in range(3):
        engine.warn_without_conntrack(store, "web")
    engine.warn_without_conntrack(store, "db")
    told = [ln for ln in capsys.readouterr().err.splitlines() if "conntrack(8) is not installed" in ln]
    assert [ln.split(":")[1].strip() for ln in told] == ["web", "db"], told
    monkeypatch.setattr(engine, "which", lambda name: "/usr/sbin/conntrack")
    engine.warn_without_conntrack(store, "mail")
    assert "conntrack" not in capsys.readouterr().err
