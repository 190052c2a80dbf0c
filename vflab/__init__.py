"""Test and demo code for virt-forward: the network-namespace lab and the demo.

Kept outside src/ so that it is not part of the installed distribution nor of the
Debian package: hypervisors get the product only.  Tests, benchmarks and
scripts/demo.sh import it from the repository root.
"""
