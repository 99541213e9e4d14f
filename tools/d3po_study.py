"""Moved to tools/studies/d3po_study.py; `python -m tools.d3po_study` keeps working (docs/MOVED.md)."""

import sys

from tools.studies.d3po_study import main

if __name__ == "__main__":
    sys.exit(main())
