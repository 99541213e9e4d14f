"""Rewrite the generated config reference (docs/config.md) in place, from the schemas.

python -m tools.update_readme

(The name is historical: the reference was a README section before it moved to docs/config.md.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from tools.config_reference import reference

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
TARGET = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def render(text: str) -> str:
    a, b = text.index(START) + len(START), text.index(END)
    return text[:a] + "\n" + reference() + text[b:]


def main() -> int:
    TARGET.write_text(render(TARGET.read_text()))
    print(f"updated {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
