"""The docs hold: the config reference (docs/config.md) is generated from the schemas and current;
every objective and variant name the schemas accept is in the README; every relative link of the
markdown pages resolves (file and anchor); every `python -m` command they name runs a module of this
checkout; the shims left at tools/ by the restructure stay three-line entry points."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import get_args

import pytest

from pipeline.schema.objective import AdaptiveConfig, ObjectiveName
from tools.update_readme import TARGET, render

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "FINDINGS.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_config_reference_is_current():
    assert TARGET == ROOT / "docs" / "config.md"
    text = TARGET.read_text()
    assert render(text) == text, "docs/config.md is stale: run python -m tools.update_readme"


def test_every_objective_and_variant_is_documented():
    import typing

    text = README.read_text()
    for name in get_args(ObjectiveName):
        assert f"| `{name}` |" in text, name
    hints = typing.get_type_hints(AdaptiveConfig)
    for key in ("spread", "spread_of", "weight", "margin", "g_scale", "score", "ipo_margin"):
        for value in get_args(hints[key]):
            assert f"`{value}`" in text, (key, value)


FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation but '-' and '_' dropped, spaces to '-', repeats -1, -2."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6} +(.*?) *#*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_the_anchor_rule_matches_githubs_on_known_headings():
    text = "# A: b's (c)\n## `stages.encode` x\n```\n# not a heading\n```\n## A: b's (c)\n"
    assert anchors(text) == {"a-bs-c", "stagesencode-x", "a-bs-c-1"}


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_path_named_in_the_prose_exists():
    """A file or folder of the checkout named in a code span (`pipeline/d3po/rewards.py`,
    `configs/train/tiny_d3po.yaml`) exists: a move that forgets a page fails here. (docs/MOVED.md
    names the old paths on purpose.)"""
    missing = []
    for page in (p for p in PAGES if p.name != "MOVED.md"):
        text = FENCE.sub("", page.read_text())
        for span in re.findall(r"`([^`\n]+)`", text):
            if re.fullmatch(r"(pipeline|stages|tools|configs|tests|docs)/[\w./-]*", span):
                if not (ROOT / span).exists():
                    missing.append(f"{page.name}: {span}")
    assert not missing, "\n".join(missing)


def _commands() -> set[str]:
    """Every module run as `python -m MODULE` (or torchrun's `-m MODULE`) of this project, in the pages,
    the Makefile and the configs' comments (`tools.X`, a placeholder, is not a name)."""
    texts = [p.read_text() for p in PAGES] + [(ROOT / "Makefile").read_text()]
    texts += [p.read_text() for p in sorted((ROOT / "configs").rglob("*.yaml"))]
    return {
        m for t in texts for m in re.findall(r"-m ((?:stages|tools|pipeline)(?:\.[a-z_][a-z0-9_]*)+)\b", t)
    }


def test_every_documented_command_runs_a_module_of_the_checkout():
    mods = _commands()
    assert {"tools.demo", "stages.train", "tools.config_reference"} <= mods  # the scan sees them
    for mod in sorted(mods):
        spec = importlib.util.find_spec(mod)
        assert spec is not None and spec.origin, f"python -m {mod}: no such module"
        assert 'if __name__ == "__main__":' in Path(spec.origin).read_text(), f"python -m {mod}: not a script"


def test_the_shims_at_tools_are_entry_points_only():
    """A shim left at an old path imports `main` from the new one and runs it: nothing else, and
    docs/MOVED.md lists it."""
    moved = (ROOT / "docs" / "MOVED.md").read_text()
    trees = {p: ast.parse(p.read_text()) for p in sorted((ROOT / "tools").glob("*.py"))}
    shims = [p for p, t in trees.items() if (ast.get_docstring(t) or "").startswith("Moved to ")]
    assert shims, "no shim found"
    for p in shims:
        body = trees[p].body[1:]  # after the docstring
        imports = [ast.unparse(n) for n in body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert len(body) == 3 and imports[0] == "import sys", p.name
        assert re.fullmatch(r"from tools\.\w+\.\w+ import main", imports[1]), (p.name, imports[1])
        assert ast.unparse(body[2]) == "if __name__ == '__main__':\n    sys.exit(main())", p.name
        assert f"`python -m tools.{p.stem}`" in moved, f"docs/MOVED.md does not list tools.{p.stem}"


@pytest.mark.slow
def test_the_cluster_install_keeps_the_torch_installed_first(tmp_path):
    """README "Cluster (GPU)": CUDA torch first, then `pip install -e .`: pip must not replace that torch
    (the project's torch range admits it). Here the CPU torch of the venv stands in for the CUDA one:
    the resolution installs the project alone."""
    import json
    import subprocess
    import sys

    report = tmp_path / "report.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-build-isolation",
            "-e",
            ".",
            "--report",
            str(report),
            "-q",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]] == [
        "adaptive-dpo-pipeline"
    ]
    readme = (ROOT / "README.md").read_text()
    assert 'pip install xformers "torch==$(python -c' in readme  # the xformers line pins torch
