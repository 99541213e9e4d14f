"""Rewrite the README's generated config reference in place.

python -m tools.update_readme
"""

from __future__ import annotations

import sys
from pathlib import Path

from tools.config_reference import reference

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(readme: str) -> str:
    a, b = readme.index(START) + len(START), readme.index(END)
    return readme[:a] + "\n" + reference() + readme[b:]


def main() -> int:
    p = Path(__file__).resolve().parents[1] / "README.md"
    p.write_text(render(p.read_text()))
    print(f"updated {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
