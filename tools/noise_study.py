"""Moved to tools/studies/noise_study.py; `python -m tools.noise_study` keeps working (docs/MOVED.md)."""

import sys

from tools.studies.noise_study import main

if __name__ == "__main__":
    sys.exit(main())
