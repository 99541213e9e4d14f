"""The embedded default, end to end on a CPU: tiny model + toy Pick-a-Pic data -> shards -> training.

    python -m tools.demo [--out demo] [--pairs 400] [--steps 20]

Every step is one of the project's own commands; the demo only chains them, so what it prints is
what a user would see running them by hand. Re-running it reuses what is already there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from stages import encode
from tools import make_pickapic, make_tiny_model


def _run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--steps", type=int, default=20)
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
    print(f"\ndemo: {m['counts']['pairs']} pairs in {len(m['shards'])} shards under {shards}")
    runs = {}
    for name in ("dpo", "adaptive_dpo"):
        run = out / "runs" / name
        _run([sys.executable, "-m", "stages.train", "--config", f"configs/train/tiny_{name}.yaml", f"data.shards={shards}",
              f"output.dir={run}", f"train.max_steps={a.steps}", "data.flip_rate=0.2"])  # fmt: skip
        runs[name] = run
    print("\ndemo summary")
    for name, run in runs.items():
        last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
        print(
            f"  {name:13s} step {last['step']}: loss {last['loss']:.4f}, implicit accuracy {last.get('accuracy', float('nan')):.2f} -> {run}/export"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
