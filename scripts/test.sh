#!/usr/bin/env bash
# The test suite: unit, golden, property, namespace, e2e and field tests, then a line per tier.
#
# As root (Debian 12/13): installs what it needs (scripts/setup.sh), runs mypy, then every tier
# as a required run: a skip that tests/skip-allowlist.txt does not allow fails it, and so does a
# tier that ran nothing (tests/tiers.py).  Works from a checkout only root can read (root's home).
# As another user: only the noroot tier (pure code against files and a fake host: no root, no
# kernel), with the .venv that setup.sh made, if this user can run it; says so first.
# As root, after the whole suite, the noroot tier runs once more as user `nobody` (issue 20: "as
# nobody, the no-root tier passes"), from a copy of the checkout and a venv of Debian's python3 in
# a 0755 temporary directory: .venv's interpreter lives under /root/.pyenv and the checkout may be
# in root's home, both of which nobody cannot read.  `scripts/test.sh --noroot-as-nobody-only`
# runs only that step.  Pytest arguments (a subset of the suite) skip it.
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRT_FORWARD_REQUIRE_TIERS=1

# The noroot tier as nobody; returns pytest's exit status (or 2 when it cannot be set up).
# Called in an `||` list, where errexit does not apply: every step checks its own status.
noroot_as_nobody() {
  local t0=$EPOCHREALTIME py=/usr/bin/python3
  if ! "$py" -c 'import ensurepip, venv, tomllib' 2>/dev/null; then
    echo "noroot as nobody: $py with venv/ensurepip (3.11+) is needed: apt-get install python3-venv" \
         "(scripts/setup.sh installs it)" >&2
    return 2
  fi
  # one directory for the whole step, removed however the script ends (EXIT also follows errexit)
  nobody_tmp=$(mktemp -d "${TMPDIR:-/tmp}/virt-forward-noroot.XXXXXX") || return 2
  trap 'rm -rf "$nobody_tmp"' EXIT
  trap 'exit 130' INT  # so that EXIT's cleanup runs on ^C too
  trap 'exit 143' TERM
  chmod 0755 "$nobody_tmp" || return 2
  if ! runuser -u nobody -- test -r "$nobody_tmp" -a -x "$nobody_tmp"; then
    echo "noroot as nobody: nobody cannot enter $nobody_tmp (a parent of it is closed to others):" \
         "set TMPDIR to a directory others may enter, e.g. TMPDIR=/tmp" >&2
    return 2
  fi
  local src=$nobody_tmp/src venv=$nobody_tmp/venv log=$nobody_tmp/setup.log out=$nobody_tmp/pytest.out
  mkdir "$src" || return 2
  # what git tracks (and new files it would track), not .venv, .git, caches or build output;
  # --ignore-failed-read: a tracked file deleted in the work tree is simply absent in the copy
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
      | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$src" || return 2
  else
    tar --exclude=./.venv --exclude=./.git --exclude=__pycache__ --exclude=./.pytest_cache \
        --exclude=./.hypothesis --exclude=./.mypy_cache --exclude=./build --exclude=./dist -cf - . \
      | tar -xf - -C "$src" || return 2
  fi
  # the package and its test extras but mypy (checked as root above; the tier never imports it)
  # and libvirt-python (never imported by pure code): read from pyproject.toml, so they stay in step
  local extras
  extras=$(cd "$src" && "$py" -c 'import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print("\n".join(d for d in deps if not d.replace("_", "-").lower().startswith("mypy")))') || return 2
  # shellcheck disable=SC2086  # one requirement per word
  if ! (umask 022 && "$py" -m venv "$venv" && "$venv/bin/python" -m pip install -q --disable-pip-version-check \
          -e "$src" $extras) >"$log" 2>&1; then
    cat "$log" >&2
    echo "noroot as nobody: could not make its venv in $venv (output above)" >&2
    return 2
  fi
  chmod -R go+rX,go-w "$nobody_tmp" || return 2  # a umask of 077 (or a checkout's own modes) would shut nobody out
  # pytest's temporary files inside ours too, so the trap removes them (not /tmp/pytest-of-nobody)
  install -d -o nobody -m 0755 "$nobody_tmp/nobody" || return 2
  local t1=$EPOCHREALTIME rc=0
  # a clean environment: only what a non-root user would have, and the required-run switches
  (cd "$src" && runuser -u nobody -- env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
      HOME=/nonexistent CI="${CI:-}" VIRT_FORWARD_REQUIRE_TIERS=1 \
      "$venv/bin/python" -m pytest -m noroot -q -ra -p no:cacheprovider \
      --basetemp="$nobody_tmp/nobody/pytest") | tee "$out" || rc=${PIPESTATUS[0]}
  local t2=$EPOCHREALTIME last passed
  last=$(grep -E '^=*\s*[0-9]+ (passed|failed|error)' "$out" | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//')
  passed=$(grep -oE '[0-9]+ passed' <<<"$last" || echo "0 passed")
  local pytest_s setup_s
  pytest_s=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
  setup_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" = 0 ]; then
    echo "noroot as nobody: $passed in $pytest_s s (copy and venv: $setup_s s)"
  else
    echo "noroot as nobody: FAILED (pytest exit $rc: ${last:-no summary}) in $pytest_s s" >&2
  fi
  return "$rc"
}

if [ "${1:-}" = --noroot-as-nobody-only ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "test: --noroot-as-nobody-only runs the tier as user nobody, which needs root" >&2
    exit 2
  fi
  shift
  [ $# = 0 ] || { echo "test: --noroot-as-nobody-only takes no other argument (got: $*)" >&2; exit 2; }
  rc=0; noroot_as_nobody || rc=$?
  exit "$rc"
fi

if [ "$(id -u)" != 0 ]; then
  py=.venv/bin/python
  if ! "$py" -c 'import pytest, hypothesis, virt_forward' >/dev/null 2>&1; then
    cat >&2 <<MSG
test: not root, and no .venv here that $(id -un) can run with pytest, hypothesis and virt_forward.
  The whole suite needs root (namespaces, a real libvirtd, systemd containers): sudo $0
  The no-root tier alone needs only a venv: python3 -m venv .venv && .venv/bin/pip install -e '.[test]'
  (as root, scripts/setup.sh makes .venv; one made from an interpreter in root's home is not
  runnable by others)
MSG
    exit 2
  fi
  echo "test: not root: running the noroot tier only (pure code against files and a fake host);" \
       "the netns, e2e, field and other tiers need root: run this as root for the whole suite" >&2
  extra=()
  [ -w . ] || extra=(-p no:cacheprovider)  # a checkout this user may only read
  exec "$py" -m pytest -ra -m noroot "${extra[@]}" "$@"
fi

bash scripts/setup.sh
.venv/bin/python -m mypy
rc=0
.venv/bin/python -m pytest -ra "$@" || rc=$?
if [ $# != 0 ]; then
  echo "noroot as nobody: not run (a subset was asked for: $*); scripts/test.sh --noroot-as-nobody-only runs it"
  exit "$rc"
fi
nobody_rc=0
noroot_as_nobody || nobody_rc=$?
# the whole suite's status first (.ci/run reads 5 as "no test collected"), then nobody's run
[ "$rc" != 0 ] && exit "$rc"
exit "$nobody_rc"
