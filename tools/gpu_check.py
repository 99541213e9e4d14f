"""Moved to tools/benchmarks/gpu_check.py; `python -m tools.gpu_check` keeps working (docs/MOVED.md)."""

import sys

from tools.benchmarks.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
