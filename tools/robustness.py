"""Moved to tools/studies/robustness.py; `python -m tools.robustness` keeps working (docs/MOVED.md)."""

import sys

from tools.studies.robustness import main

if __name__ == "__main__":
    sys.exit(main())
