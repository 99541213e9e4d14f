"""The README's config reference is generated from the schemas and must be current; every
objective and variant name the schemas accept appears in it."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from pipeline.schema.objective import AdaptiveConfig, ObjectiveName
from tools.update_readme import render

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


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


@pytest.mark.slow
def test_the_cluster_install_keeps_the_torch_installed_first(tmp_path):
    """README "Cluster (GPU)": CUDA torch first, then `pip install -e .`: pip must not replace that torch
    (the project's torch range admits it). Here the CPU torch of the venv stands in for the CUDA one:
    the resolution installs the project alone."""
    import json
    import subprocess
    import sys

    report = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "-e", ".",
                        "--report", str(report), "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]] == [
        "adaptive-dpo-pipeline"
    ]
    readme = (ROOT / "README.md").read_text()
    assert 'pip install xformers "torch==$(python -c' in readme  # the xformers line pins torch
