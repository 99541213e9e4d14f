"""Moved to tools/benchmarks/bench.py; `python -m tools.bench` keeps working (docs/MOVED.md)."""

import sys

from tools.benchmarks.bench import main

if __name__ == "__main__":
    sys.exit(main())
