"""Tiers of the suite, required runs and the per-tier summary (hooks imported by conftest.py).

Every test lands in exactly one tier, marked from here so that no test file has to say it:

- e2e:    tests/e2e (a real libvirtd and real guests)
- field:  tests/field (systemd systems booted with nspawn, the .deb installed with apt)
- netns:  a test that makes network namespaces or loads real rules: marked so, or its code (or
          that of a fixture it uses) calls a namespace helper of netns_util or runs `unshare`
          or `ip netns`
- other:  needs root without a kernel namespace (files chowned to another owner, ...): the
          `root` marker, found as described in _needs_root()
- noroot: everything else: pure code against files and fakes, run as `nobody` in CI's sense
          (`pytest -m noroot`, under 30 s)

Required runs (CI=true, or VIRT_FORWARD_REQUIRE_TIERS=1 which scripts/test.sh sets): a skip
that tests/skip-allowlist.txt does not name fails the run, naming the test and its reason; so
does a required tier that ran nothing in a run of the whole suite.  Whatever the mode, the run
ends with one line per tier: run, passed, failed, errors (with the fixture that failed), skipped
(with the reasons) and seconds.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType
from typing import Any, Callable, Generator, Iterator

import pytest

HERE = Path(__file__).resolve().parent
ALLOWLIST = HERE / "skip-allowlist.txt"
TIERS = ("noroot", "netns", "e2e", "field", "other")
# the tiers a run of the whole suite must run something in ("other" may well be empty one day)
REQUIRED = ("noroot", "netns", "e2e", "field")
# what a test (or a fixture it uses) refers to when it makes a namespace or needs one: netns_util's
# helpers by name, or a command line holding "unshare" or "netns" ("ip netns exec ...")
NETNS_NAMES = frozenset({"lab_world", "make_world", "empty_netns", "need_root_and_tools"})
NETNS_WORDS = frozenset({"unshare", "netns"})

# Tests that need root without a namespace and that no rule of _needs_root() finds: each with why.
# As `nobody` they cannot make what they check (a file of another owner, ...).  Patterns match
# node ids (fnmatch).
ROOT_ONLY: dict[str, str] = {
    # tests/test_config.py: a file or link of uid 65534 (the other owner), which is the trusted uid
    # itself when run as nobody, and which only root can make; _tree() itself is the trusted owner's
    "tests/test_config.py::test_config_dir_of_another_owner_is_refused": "chowns the config dir to uid 65534",
    "tests/test_config.py::test_a_symlink_of_another_owner_on_the_way_is_refused": "lchowns a symlink to uid 65534",
    "tests/test_config.py::test_guests_dir_owned_by_someone_else_is_refused":
        "chowns guests/ to uid 65534, which is the trusted uid itself when run as nobody",
    "tests/test_edit.py::test_add_creates_file_with_address": "asserts that the file made is root's",
    "tests/test_edit.py::test_keeps_owner_and_mode": "chowns the guest file to root:5",
    "tests/test_import.py::test_import_case*": "asserts that the files made are root's",
    "tests/test_hook_file.py::test_strict_blocks_only_prepare_and_start":
        "runs the hook in a subprocess, which trusts root's config files only",
    "tests/test_hook_file.py::test_not_strict_an_invalid_file_does_not_block":
        "runs the hook in a subprocess, which trusts root's config files only",
}


def strict_mode() -> bool:
    """Skips outside the allow-list fail the run: in CI, and when scripts/test.sh asks."""
    return (os.environ.get("CI", "").lower() in ("true", "1", "yes")
            or os.environ.get("VIRT_FORWARD_REQUIRE_TIERS") == "1")


# ---------------------------------------------------------------- which tier

@dataclass(frozen=True)
class Refs:
    names: frozenset[str]  # globals and attributes the code uses
    words: frozenset[str]  # its string constants
    skips_without_root: bool  # it says `os.geteuid() != 0` (its text is read only when it names geteuid)


_refs: dict[Any, Refs] = {}


def _code_refs(code: CodeType) -> tuple[set[str], set[str]]:
    names, words = set(code.co_names), set()
    for const in code.co_consts:
        if isinstance(const, str):
            words.add(const)
        elif isinstance(const, CodeType):  # a nested function, lambda or comprehension
            inner = _code_refs(const)
            names |= inner[0]
            words |= inner[1]
    return names, words


def _refs_of_func(func: Callable[..., Any]) -> Refs:
    func = inspect.unwrap(func)
    if func not in _refs:
        code = getattr(func, "__code__", None)
        names, words = _code_refs(code) if code is not None else (set(), set())
        _refs[func] = Refs(frozenset(names), frozenset(words),
                           "geteuid" in names and "geteuid() != 0" in inspect.getsource(func))
    return _refs[func]


def _refs_of(item: pytest.Item) -> Iterator[Refs]:
    """What the test function refers to, and every fixture it uses, directly or not (its code,
    not its text: a docstring that names a helper is no call of it)."""
    func = getattr(item, "function", None)
    if func is not None:
        yield _refs_of_func(func)
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        defs = info.name2fixturedefs.get(name) if info is not None else None
        if defs:
            yield _refs_of_func(defs[-1].func)


def _needs_root(item: pytest.Item) -> str | None:
    """Why this test needs root although it makes no namespace, or None."""
    for pattern, why in ROOT_ONLY.items():
        if fnmatch.fnmatchcase(item.nodeid, pattern):
            return why
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("uid", 0) != 0:  # test_config's parametrized owners: a file of another uid
        return f"makes a file owned by uid {params['uid']}"
    if any(refs.skips_without_root for refs in _refs_of(item)):
        return "it skips without root (`os.geteuid() != 0`)"
    return None


def _makes_a_namespace(item: pytest.Item) -> bool:
    return any(refs.names & NETNS_NAMES or refs.words & NETNS_WORDS for refs in _refs_of(item))


def tier_of(item: pytest.Item) -> str:
    path = str(item.path)
    for tier in ("e2e", "field"):
        if path.startswith(f"{HERE}/{tier}/") or item.get_closest_marker(tier):
            return tier
    if item.get_closest_marker("netns") or _makes_a_namespace(item):
        return "netns"
    if item.get_closest_marker("root") or _needs_root(item):
        return "other"
    return "noroot"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        wrong = [m for m in ("noroot", "netns", "e2e", "field") if m != tier and item.get_closest_marker(m)]
        if wrong:
            raise pytest.UsageError(f"{item.nodeid}: marked {', '.join(wrong)} but it belongs to the {tier} tier "
                                    f"(see tests/tiers.py)")
        item.add_marker("root" if tier == "other" else tier)
        item.stash[_TIER] = tier


_TIER = pytest.StashKey[str]()


# ---------------------------------------------------------------- the allow-list of skips

@dataclass(frozen=True)
class Allowed:
    pattern: str
    reason: str


def load_allowlist(path: Path = ALLOWLIST) -> list[Allowed]:
    """`<node id pattern> <reason>` per line; # starts a comment line.  A pattern without a
    reason is refused: a skip is only acceptable with a stated reason."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, _, reason = line.partition(" ")
        if not reason.strip():
            raise pytest.UsageError(f"{path}:{n}: {pattern!r} has no reason: write `<pattern> <why it may skip>`")
        out.append(Allowed(pattern, reason.strip()))
    return out


# ---------------------------------------------------------------- what each tier did

@dataclass
class Tally:
    run: int = 0
    passed: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # the cause's first line -> count
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    seconds: float = 0.0


@dataclass
class Record:
    strict: bool
    allowed: list[Allowed]
    tallies: dict[str, Tally] = field(default_factory=lambda: {t: Tally() for t in TIERS})
    tier: dict[str, str] = field(default_factory=dict)  # node id -> tier
    unexpected: list[tuple[str, str]] = field(default_factory=list)  # (node id, reason)
    fixture_failures: dict[int, tuple[BaseException, str]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


_RECORD = pytest.StashKey[Record]()
_config: pytest.Config | None = None


def configure(config: pytest.Config) -> None:
    """conftest.py's pytest_configure calls this."""
    config.stash[_RECORD] = Record(strict=strict_mode(), allowed=load_allowlist())
    global _config
    _config = config  # pytest_runtest_logreport is given no config


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any],
                         request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
    """Remember which fixture raised what: the summary names it (a failed session fixture is
    raised again, the same exception, for every test that uses it)."""
    try:
        return (yield)
    except BaseException as exc:
        if not isinstance(exc, pytest.skip.Exception):
            failures = request.config.stash[_RECORD].fixture_failures
            failures.setdefault(id(exc), (exc, fixturedef.argname))
        raise


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:200]
    return "(no message)"


def _gist(exc: BaseException) -> str:
    """One line for the summary: the message's first line and, when there are more, its last
    (a failed build says what failed first and why last), without pytest's `assert ...` part."""
    lines = [ln.strip() for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
    cut = next((i for i, ln in enumerate(lines) if i > 0 and ln.startswith("assert ")), len(lines))
    lines = lines[:cut] or ["(no message)"]
    gist = lines[0][:200] if len(lines) == 1 else f"{lines[0][:150]} ... {lines[-1][:150]}"
    return gist


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.when == "setup" and report.failed and call.excinfo is not None:
        exc = call.excinfo.value
        failed = item.config.stash[_RECORD].fixture_failures.get(id(exc))
        why = _gist(exc)
        cause = f"fixture {failed[1]} failed: {why}" if failed and failed[0] is exc else f"setup failed: {why}"
        report.user_properties.append(("tier_error", cause))
    return report


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return _first_line(str(longrepr))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _config
    if config is None:
        return
    rec = config.stash[_RECORD]
    tier = rec.tier.get(report.nodeid, "other")
    tally = rec.tallies[tier]
    tally.seconds += report.duration
    if report.when == "setup":
        tally.run += 1
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        tally.skipped[reason] += 1
        if not any(fnmatch.fnmatchcase(report.nodeid, a.pattern) for a in rec.allowed):
            rec.unexpected.append((report.nodeid, reason))
    elif report.failed and report.when != "call":
        cause = dict(report.user_properties).get("tier_error") or (
            f"{report.when} failed: " + _first_line(str(report.longrepr).splitlines()[-1] if report.longrepr else ""))
        tally.errors[str(cause)] += 1
    elif report.when == "call":
        if report.passed:
            tally.passed += 1
        elif report.failed:
            tally.failed += 1


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    rec = session.config.stash[_RECORD]
    rec.tier = {item.nodeid: item.stash.get(_TIER, "other") for item in session.items}


def _whole_suite(config: pytest.Config) -> bool:
    """Run on the default paths with no -m/-k: every required tier must have run something."""
    opt = config.option
    return (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not getattr(opt, "markexpr", "")
            and not getattr(opt, "keyword", "") and not getattr(opt, "lf", False)
            and not getattr(opt, "collectonly", False))


def _empty_required_tiers(config: pytest.Config) -> list[str]:
    rec = config.stash[_RECORD]
    if not (rec.strict and _whole_suite(config)):
        return []
    return [t for t in REQUIRED if rec.tallies[t].run == 0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    rec = session.config.stash[_RECORD]
    if getattr(session.config.option, "collectonly", False):
        return
    if rec.strict and (rec.unexpected or _empty_required_tiers(session.config)) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _line(tier: str, t: Tally) -> str:
    if t.run == 0:
        return f"{tier}: no test ran"
    parts = [f"{t.run} tests", f"{t.passed} passed"]
    if t.failed:
        parts.append(f"{t.failed} failed")
    for cause, n in t.errors.most_common():
        parts.append(f"{n} error{'s' if n > 1 else ''}: {cause}")
    n_skipped = sum(t.skipped.values())
    parts.append(f"{n_skipped} skipped" + (" (" + "; ".join(
        f"{n} x {reason}" for reason, n in t.skipped.most_common()) + ")" if n_skipped else ""))
    parts.append(f"{t.seconds:.1f} s")
    return f"{tier}: " + ", ".join(parts)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if getattr(config.option, "collectonly", False):
        return
    rec = config.stash[_RECORD]
    tr = terminalreporter
    mode = "required: skips outside tests/skip-allowlist.txt fail the run" if rec.strict else \
        "not required (set CI=true or VIRT_FORWARD_REQUIRE_TIERS=1 to make skips fail)"
    tr.section(f"tiers ({mode})", sep="=")
    for tier in TIERS:
        tr.write_line(_line(tier, rec.tallies[tier]))
    if rec.strict and rec.unexpected:
        tr.write_line(f"FAILED: {len(rec.unexpected)} skip(s) that tests/skip-allowlist.txt does not allow:", red=True)
        for nodeid, reason in rec.unexpected:
            tr.write_line(f"  {nodeid}: {reason}", red=True)
    for tier in _empty_required_tiers(config):
        tr.write_line(f"FAILED: the {tier} tier ran no test in a run of the whole suite", red=True)
