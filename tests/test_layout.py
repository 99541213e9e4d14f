"""The house's shape, read from the source: every import of pipeline/ points down its layers, no
module imports another in a circle, the library never imports stages/ or tools/, stages are thin."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Layers, lowest first. A module may import its own layer or those below (cycles aside).
LAYERS = [
    {"errors", "io", "config", "cli", "dist_env", "minority", "metrics_log", "schema"},  # foundations
    {"models", "data", "losses", "encoders"},  # model folders, data formats, pure maths
    {"engine", "export"},  # distributed training machinery
    {"evaluate", "label"},  # evaluation, the labelling service
    {"train", "d3po"},  # the trainer's workloads, the online loop's library
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_layout.py (add its package)")


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).replace(".__init__", "")


def _imports(path: Path) -> set[str]:
    """Project modules imported at module level or anywhere in the file (``from a.b import c`` counts
    ``a.b.c`` when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            if n.split(".")[0] in ("pipeline", "stages", "tools") and (
                (ROOT / Path(*n.split("."))).with_suffix(".py").is_file()
                or (ROOT / Path(*n.split(".")) / "__init__.py").is_file()
            ):
                out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in sorted((ROOT / "pipeline").rglob("*.py"))}


def test_every_library_import_points_down_and_never_up_to_stages_or_tools():
    up, outside = [], []
    for mod, deps in _graph().items():
        for d in deps:
            if not d.startswith("pipeline"):
                outside.append(f"{mod} -> {d}")
            elif d != "pipeline" and mod != "pipeline" and _layer(d) > _layer(mod):
                up.append(f"{mod} (layer {_layer(mod)}) -> {d} (layer {_layer(d)})")
    assert not outside, "the library imports stages/ or tools/:\n" + "\n".join(outside)
    assert not up, "imports pointing up:\n" + "\n".join(sorted(up))


def test_no_import_cycles():
    g = _graph()
    seen, stack, on_stack, cycles = set(), [], set(), []

    def visit(n):
        seen.add(n)
        stack.append(n)
        on_stack.add(n)
        for d in g.get(n, ()):
            if d in on_stack:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in seen and d in g:
                visit(d)
        stack.pop()
        on_stack.discard(n)

    for n in g:
        if n not in seen:
            visit(n)
    assert not cycles, "\n".join(cycles)


def test_the_layer_check_sees_an_upward_import():
    assert _layer("pipeline.losses.dpo") < _layer("pipeline.engine.build") < _layer("pipeline.train.pairs")
    assert "pipeline.losses.diffusion" in _graph()["pipeline.train.pair_step"]


def test_stages_are_thin_entry_points():
    """A stage is a CLI over library calls: no stage imports another, and each is short."""
    for p in sorted((ROOT / "stages").glob("*.py")):
        if p.name == "__init__.py":
            continue
        deps = _imports(p)
        assert not [d for d in deps if d.startswith("stages")], f"{p.name} imports a stage: {deps}"
        lines = len(p.read_text().splitlines())
        limit = 220 if p.name == "label.py" else 120  # label: a CLI of seven small subcommands
        assert lines <= limit, f"stages/{p.name}: {lines} lines; library logic belongs in pipeline/"
