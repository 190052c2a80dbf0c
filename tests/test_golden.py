"""Golden nft batches (the contract with the kernel), plan records and parse_live.

tests/data/golden/<case>/ holds guest.toml (the guest is named <case>), an
optional config.toml, and the expected batches:

- apply.nft   = nft.change(None, plan, hairpin=settings.hairpin)
- reapply.nft = nft.change(plan, plan, hairpin=settings.hairpin)
- remove.nft  = nft.change(plan, None, hairpin=settings.hairpin, last=False)
- full.nft    = nft.full([plan], hairpin=settings.hairpin): the rebuild (reconcile, watcher)
- iptables4.rules, iptables6.rules = iptables.render(...) for the iptables backend: the
  guest applied onto an empty nat table, beside libvirt 9.0's FORWARD chain (the guard goes
  on top); a file is absent when the guest has no forward of that family

Regenerate with `pytest tests/test_golden.py --update-golden` (refused when CI is
set; the tests that wrote then skip), then read the diff: it is the change in what
the kernel gets.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import write_trusted
from virt_forward import guards, iptables, nft
from virt_forward.config import GuestConfig, Settings, load_guest, load_settings
from virt_forward.plan import Family, Forward, GuestPlan, plan_guest
from virt_forward.ports import PROTOCOLS

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
CASES = sorted(p for p in GOLDEN.iterdir() if p.is_dir())


def load_case(case: Path, cdir: Path) -> tuple[GuestPlan, Settings]:
    write_trusted(cdir / "guests" / f"{case.name}.toml", (case / "guest.toml").read_bytes())
    if (case / "config.toml").exists():
        write_trusted(cdir / "config.toml", (case / "config.toml").read_bytes())
    settings = load_settings(cdir)
    guest = load_guest(cdir, case.name)
    assert guest is not None
    return plan_guest(guest, settings), settings


# libvirt 9.0's filter FORWARD on a host with one NAT network (as iptables-save prints it)
LIBVIRT_FILTER = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:LIBVIRT_FWI - [0:0]
:LIBVIRT_FWO - [0:0]
:LIBVIRT_FWX - [0:0]
-A FORWARD -j LIBVIRT_FWX
-A FORWARD -j LIBVIRT_FWI
-A FORWARD -j LIBVIRT_FWO
COMMIT
"""


def _subnets(plan: GuestPlan) -> dict[str, iptables.IPNet]:
    """Each guest address's libvirt network, as discovery would find it (/24, /64)."""
    return {str(f.guest): ipaddress.ip_network(f"{f.guest}/{24 if f.family == 4 else 64}", strict=False)
            for f in plan.forwards}


def rendered(plan: GuestPlan, settings: Settings) -> dict[str, str]:
    out = {
        "apply.nft": nft.change(None, plan, hairpin=settings.hairpin),
        "reapply.nft": nft.change(plan, plan, hairpin=settings.hairpin),
        "remove.nft": nft.change(plan, None, hairpin=settings.hairpin, last=False),
        "full.nft": nft.full([plan], hairpin=settings.hairpin),
    }
    for family in (4, 6):
        if iptables.has_family(plan, family):
            out[f"iptables{family}.rules"] = iptables.render(
                family, iptables.NatState(), [plan], [plan], settings.hairpin, _subnets(plan),
                guards.parse_filter(LIBVIRT_FILTER))
    return out


def test_enough_cases() -> None:
    assert len(CASES) >= 8


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case: Path, cdir: Path, update_golden: bool) -> None:
    plan, settings = load_case(case, cdir)
    out = rendered(plan, settings)
    if update_golden:
        for name, text in out.items():
            (case / name).write_text(text)
        pytest.skip(f"--update-golden: wrote {', '.join(sorted(out))} in {case}: review the diff")
    # no file of the case is left unchecked (a renamed output would leave a stale file behind)
    assert sorted(p.name for p in case.iterdir() if p.name not in ("guest.toml", "config.toml")) == sorted(out)
    for name, text in out.items():
        path = case / name
        assert text == path.read_text(), f"{path} differs: run pytest --update-golden and review the diff"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_batches_hold_this_guest_only(case: Path, cdir: Path) -> None:
    """Checks that do not depend on the exact text: what a reviewer would look for."""
    plan, settings = load_case(case, cdir)
    out = rendered(plan, settings)
    for name, text in out.items():
        assert text.endswith("\n") and "\n\n" not in text
        if not name.endswith(".nft"):
            continue
        assert all(line.split()[1:3] == ["table", "inet"] or f" {nft.T} " in line
                   for line in text.splitlines()), "every command names our table only"
    apply = out["apply.nft"]
    for fwd in plan.forwards:
        name, key, value = nft.dnat_element(fwd)
        assert f"{' . '.join(key)} : {' . '.join(value)}" in apply
    assert ("masquerade" in apply) is settings.hairpin
    assert ("nat_output fib daddr type local jump lookup" in apply) is settings.hairpin
    assert ("jump " + nft.acl_chain(plan) in apply) is (plan.allow is not None)
    # a removal deletes every element it added and deletes no foreign object
    remove = out["remove.nft"]
    for fwd in plan.forwards:
        name, key, _ = nft.dnat_element(fwd)
        assert f"delete element {nft.T} {name} {{" in remove and " . ".join(key) in remove
    assert "delete table" not in remove and "flush ruleset" not in remove
    # reapply is remove-then-add in one transaction
    assert out["reapply.nft"].endswith(nft.batch(nft.add_guest(plan)))
    # a rebuild replaces the whole table: exactly this guest's elements, nothing of apply's lost
    assert out["full.nft"].startswith("add table inet virt_forward\ndelete table inet virt_forward\n")
    for fwd in plan.forwards:
        name, key, value = nft.dnat_element(fwd)
        assert f"{' . '.join(key)} : {' . '.join(value)}" in out["full.nft"]
    # iptables: one DNAT rule per forward of the family, the guard first in FORWARD, no flush of
    # a table we do not own (iptables-restore --noflush; only our chains are declared)
    for family in (4, 6):
        rules = out.get(f"iptables{family}.rules")
        assert (rules is not None) is iptables.has_family(plan, family)
        if rules is None:
            continue
        dnats = [ln for ln in rules.splitlines() if " -j DNAT " in ln]
        assert len(dnats) == sum(1 for f in plan.forwards if f.family == family)
        assert f"-I FORWARD 1 {guards.GUARD_SPEC}" in rules
        declared = [ln[1:].split()[0] for ln in rules.splitlines() if ln.startswith(":")]
        assert all(c.startswith("VF-") for c in declared), declared


@pytest.mark.netns
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_rebuild_and_iptables_load_in_real_tools(case: Path, tmp_path: Path) -> None:
    """full.nft loads (twice: a rebuild over a rebuild); each iptables file goes through
    iptables-restore --noflush beside libvirt's FORWARD chain, leaving the guard on top."""
    why = _nft_check_possible()
    if why:
        pytest.skip(why)
    (tmp_path / "filter").write_text(LIBVIRT_FILTER)
    script = f"nft -f {shlex.quote(str(case / 'full.nft'))} && nft -f {shlex.quote(str(case / 'full.nft'))}"
    for family, tool in ((4, "iptables"), (6, "ip6tables")):
        rules = case / f"iptables{family}.rules"
        if rules.exists():
            script += (f" && {tool}-restore < {tmp_path / 'filter'} && {tool}-restore --noflush < "
                       f"{shlex.quote(str(rules))} && {tool}-save -t filter")
    proc = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    saved = proc.stdout.split("*filter")[1:]
    assert len(saved) == sum((case / f"iptables{f}.rules").exists() for f in (4, 6))
    for table in saved:
        forward = [ln for ln in table.splitlines() if ln.startswith("-A FORWARD ")]
        assert guards.GUARD_COMMENT in forward[0] and len(forward) == 4, forward


def test_last_removal_deletes_the_table(cdir: Path) -> None:
    plan, settings = load_case(GOLDEN / "v4-only", cdir)
    assert nft.change(plan, None, hairpin=True, last=True) == \
        "add table inet virt_forward\ndelete table inet virt_forward\n"


def _nft_check_possible() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("nft", "unshare"):
        if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
            return f"{tool} not installed"
    return None


@pytest.mark.netns
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_batches_load_in_a_real_nft(case: Path, tmp_path: Path) -> None:
    """apply, reapply (twice), remove, all accepted by nft, in a throwaway namespace (unshare -n)."""
    why = _nft_check_possible()
    if why:
        pytest.skip(why)
    script = " && ".join(f"nft -f {shlex.quote(str(case / n))}" for n in ("apply.nft", "reapply.nft", "reapply.nft", "remove.nft"))
    script += " && nft -j list table inet virt_forward"
    proc = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    live = nft.parse_live(json.loads(proc.stdout))
    assert all(not elems for elems in live.values()), f"remove left elements: {live}"


# ---------------------------------------------------------------- state records

@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_record_round_trips_through_json(case: Path, cdir: Path) -> None:
    plan, _ = load_case(case, cdir)
    record = json.loads(json.dumps(plan.to_record()))
    assert GuestPlan.from_record(record) == plan
    assert GuestPlan.from_record(record).tag == plan.tag


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@st.composite
def plans(draw: st.DrawFn) -> GuestPlan:
    forwards = []
    for _ in range(draw(st.integers(0, 6))):
        family: Family = draw(st.sampled_from([4, 6]))
        guest = draw(st.ip_addresses(v=family))
        public = draw(st.one_of(st.none(), st.ip_addresses(v=family)))
        forwards.append(Forward(family, draw(st.sampled_from(PROTOCOLS)), draw(st.integers(1, 65535)),
                                public, guest, draw(st.integers(1, 65535))))
    allow = draw(st.one_of(st.none(), st.lists(
        addresses.map(lambda a: ipaddress.ip_network(a)), min_size=1, max_size=3).map(tuple)))
    return GuestPlan(draw(st.text(min_size=1, max_size=30)), tuple(forwards), allow)


@given(plans())
def test_any_record_round_trips(plan: GuestPlan) -> None:
    assert GuestPlan.from_record(json.loads(json.dumps(plan.to_record()))) == plan


# ---------------------------------------------------------------- parse_live

LIVE = DATA / "nft" / "live-list.json"  # `nft -j list table inet virt_forward`, nft 1.0.6, see README there


def test_parse_live_on_a_real_listing() -> None:
    live = nft.parse_live(json.loads(LIVE.read_text()))
    assert set(live) == {"dnat4", "dnat4_any", "acl4", "acl4_any", "dnat6", "dnat6_any", "acl6", "acl6_any"}
    assert live["dnat4"][("192.0.2.1", "udp", "8001")] == ("10.1.1.2", "9001")
    assert live["dnat4"][("192.0.2.1", "tcp", "2222")] == ("10.1.1.2", "22")
    assert live["dnat6"][("2001:db8::1", "tcp", "80")] == ("fd00::2", "80")
    assert live["dnat4_any"] == {("tcp", "25"): ("10.1.1.3", "25"), ("tcp", "5432"): ("10.1.1.3", "5432")}
    assert live["dnat6_any"] == {} and live["acl4_any"] == {}
    assert len(live["acl4"]) == 4 and set(live["acl6"].values()) == {("jump acl_g4b5e57f6eb2f",)}


def _elements_of(plans_: list[GuestPlan]) -> dict[str, dict[tuple[str, ...], tuple[str, ...]]]:
    want: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {}
    for plan in plans_:
        for fwd in plan.forwards:
            name, key, value = nft.dnat_element(fwd)
            want.setdefault(name, {})[key] = value
            if plan.allow is not None:
                acl = nft.NAMES[fwd.family].acl_any if fwd.public is None else nft.NAMES[fwd.family].acl
                want.setdefault(acl, {})[key] = ("jump " + nft.acl_chain(plan),)
    return want


def _guest_from(src: Path, cdir: Path) -> GuestConfig:
    write_trusted(cdir / "guests" / src.name, src.read_bytes())
    guest = load_guest(cdir, src.stem)
    assert guest is not None
    return guest


def test_parse_live_matches_what_the_renderer_adds(cdir: Path) -> None:
    """The listing came from applying these two guests; parse_live must give back exactly their elements."""
    web = plan_guest(_guest_from(DATA / "nft" / "web.toml", cdir), Settings())
    db = plan_guest(_guest_from(DATA / "nft" / "db.toml", cdir), Settings())
    live = {k: v for k, v in nft.parse_live(json.loads(LIVE.read_text())).items() if v}
    assert live == _elements_of([web, db])


def _strip_counters(listing: Any) -> Any:
    """The same listing as older renderers (maps without `counter`) produce it."""
    out = copy.deepcopy(listing)
    for item in out["nftables"]:
        m = item.get("map")
        if isinstance(m, dict):
            m.pop("stmt", None)
            m["elem"] = [[e[0]["elem"]["val"] if isinstance(e[0], dict) and "elem" in e[0] else e[0], e[1]]
                         for e in m.get("elem", [])]
    return out


def test_parse_live_without_counters_and_empty() -> None:
    listing = json.loads(LIVE.read_text())
    assert nft.parse_live(_strip_counters(listing)) == nft.parse_live(listing)
    assert nft.parse_live({"nftables": []}) == {}
    assert nft.parse_live({}) == {}
