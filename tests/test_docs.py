"""The README's config reference is generated from the schemas and must be current; every
objective and variant name the schemas accept appears in it."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from pipeline.schema.objective import AdaptiveConfig, ObjectiveName
from tools.update_readme import render

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_reference_is_current():
    text = README.read_text()
    assert render(text) == text, "README config reference is stale: run python -m tools.update_readme"


def test_every_objective_and_variant_is_documented():
    import typing

    text = README.read_text()
    for name in get_args(ObjectiveName):
        assert f"| `{name}` |" in text, name
    hints = typing.get_type_hints(AdaptiveConfig)
    for key in ("spread", "spread_of", "weight", "margin", "g_scale", "score", "ipo_margin"):
        for value in get_args(hints[key]):
            assert f"`{value}`" in text, (key, value)
