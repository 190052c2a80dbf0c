#!/usr/bin/env bash
# The built-in demo: namespaces for a host, a guest and a client; no libvirt needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the demo lives in vflab/ (repository root), not in the product: -m from here finds it
exec .venv/bin/python -m vflab
