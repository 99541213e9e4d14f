"""Moved to tools/toy/make_tiny_model.py; `python -m tools.make_tiny_model` keeps working (docs/MOVED.md)."""

import sys

from tools.toy.make_tiny_model import main

if __name__ == "__main__":
    sys.exit(main())
