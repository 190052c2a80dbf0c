"""`python -m vflab` (from the repository root): the demo."""

import sys

from vflab.demo import run_demo

sys.exit(run_demo())
