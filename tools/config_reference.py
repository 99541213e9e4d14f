"""Print the config reference (every key, its type, default and meaning) as markdown, from the schemas.

    python -m tools.config_reference > /tmp/ref.md

docs/config.md holds this output (written by tools.update_readme); tests/test_docs.py checks that it is current.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing

from pipeline.config import _type_name
from pipeline.schema.encode import EncodeConfig
from pipeline.schema.evaluate import EvalConfig
from pipeline.schema.feedback import FeedbackConfig
from pipeline.schema.label import LabelConfig
from pipeline.schema.online import OnlineConfig
from pipeline.schema.sample import SampleConfig
from pipeline.schema.train import TrainConfig

STAGES = {
    "encode": EncodeConfig,
    "sample": SampleConfig,
    "train": TrainConfig,
    "evaluate": EvalConfig,
    "label serve": LabelConfig,
    "feedback": FeedbackConfig,
    "online": OnlineConfig,
}


def _comments(cls) -> dict[str, str]:
    """field name -> the trailing comment of its (possibly multi-line, formatted) declaration."""
    src = textwrap.dedent(inspect.getsource(cls))
    spans = {
        n.target.id: (n.lineno, n.end_lineno)
        for n in ast.walk(ast.parse(src))
        if isinstance(n, ast.AnnAssign)
    }
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            for name, (a, b) in spans.items():
                if a <= tok.start[0] <= b:
                    out[name] = tok.string.lstrip("#").strip()
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
        return "" if dataclasses.is_dataclass(v) else repr(v)
    return "**required**"


def rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    notes = _comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += rows(tp, key + ".")
        else:
            out.append((key, _type_name(tp), _default(f), notes.get(f.name, "")))
    return out


def reference() -> str:
    parts = []
    for stage, cls in STAGES.items():
        parts.append(f"### `stages.{stage}`\n")
        parts.append("| key | type | default | meaning |")
        parts.append("|---|---|---|---|")
        for key, tp, default, note in rows(cls):
            cells = [f"`{key}`", tp, default, note]
            parts.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
        parts.append("")
    return "\n".join(parts)


def main() -> int:
    print(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
