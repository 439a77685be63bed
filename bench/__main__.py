"""`python -m bench`: the throughput harness (see bench.cli and docs/benchmarks.md)."""

import sys

from bench.cli import main

sys.exit(main())
