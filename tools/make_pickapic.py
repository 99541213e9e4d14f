"""Moved to tools/toy/make_pickapic.py; `python -m tools.make_pickapic` keeps working (docs/MOVED.md)."""

import sys

from tools.toy.make_pickapic import main

if __name__ == "__main__":
    sys.exit(main())
