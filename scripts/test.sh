#!/usr/bin/env bash
# The test suite: unit, golden, property, namespace, e2e and field tests, then a line per tier.
#
# As root (Debian 12/13): installs what it needs (scripts/setup.sh), runs mypy, then every tier
# as a required run: a skip that tests/skip-allowlist.txt does not allow fails it, and so does a
# tier that ran nothing (tests/tiers.py).  Works from a checkout only root can read (root's home).
# As another user: only the noroot tier (pure code against files and a fake host: no root, no
# kernel), with the .venv that setup.sh made, if this user can run it; says so first.
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRT_FORWARD_REQUIRE_TIERS=1

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
exec .venv/bin/python -m pytest -ra "$@"
