"""The embedded default, end to end on a CPU: tiny model + toy Pick-a-Pic data -> shards -> summary.

    python -m tools.demo [--out demo] [--pairs 400]

Every step is one of the project's own commands; the demo only chains them, so what it prints is
what a user would see running them by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages import encode
from tools import make_pickapic, make_tiny_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--pairs", type=int, default=400)
    a = p.parse_args(argv)
    out = Path(a.out)
    model, data, shards = out / "models" / "sd15", out / "pickapic", out / "shards"
    if not (model / "model_index.json").is_file():
        make_tiny_model.main(["--family", "sd15", "--out", str(model), "--seed", "0"])
    if not data.is_dir():
        make_pickapic.main(
            [
                "--out",
                str(data),
                "--pairs",
                str(a.pairs),
                "--seed",
                "0",
                "--corrupt",
                "1",
                "--null-caption",
                "1",
            ]
        )
    rc = encode.cli_main(
        [
            "--config",
            "configs/encode/tiny.yaml",
            f"model.path={model}",
            f"data.source={data}",
            f"output.dir={shards}",
        ]
    )
    if rc:
        return rc
    m = json.loads((shards / "manifest.json").read_text())
    print(
        f"\ndemo: {m['counts']['pairs']} pairs in {len(m['shards'])} shards under {shards} (manifest.json, plan.json)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
