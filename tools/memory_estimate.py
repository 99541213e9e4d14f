"""Moved to tools/benchmarks/memory_estimate.py; `python -m tools.memory_estimate` keeps working (docs/MOVED.md)."""

import sys

from tools.benchmarks.memory_estimate import main

if __name__ == "__main__":
    sys.exit(main())
