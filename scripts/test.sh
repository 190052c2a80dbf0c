#!/usr/bin/env bash
# The whole test suite: unit, golden, property and namespace tests, then mypy.
# Run as root on Debian 12/13; installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m mypy
.venv/bin/python -m pytest -ra "$@"
