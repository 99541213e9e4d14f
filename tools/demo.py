"""The embedded default, end to end on a CPU: tiny model + toy Pick-a-Pic data with 20 % flipped
labels -> shards -> DPO, Adaptive-DPO and Robust-DPO at a guessed flip rate (DeepSpeed ZeRO-2 on the
CPU) -> evaluation report.

    python -m tools.demo [--out demo] [--pairs 800] [--steps 150]

Every step is one of the project's own commands, printed before it runs; the demo only chains them.
Re-running it reuses what is already there (finished shards and runs are skipped).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tools.toy import make_pickapic, make_tiny_model


def _run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--pairs", type=int, default=800)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--flip-rate", type=float, default=0.2)
    a = p.parse_args(argv)
    out = Path(a.out)
    py = sys.executable
    model = out / "models" / "sd15"
    if not (model / "model_index.json").is_file():
        # a VAE trained briefly as an autoencoder, so latents carry the images (tools/toy/make_tiny_model.py)
        make_tiny_model.main(["--family", "sd15", "--out", str(model), "--seed", "0", "--vae-steps", "300"])
    for name, n, seed, bad in (
        ("train", a.pairs, 0, ["--corrupt", "1", "--null-caption", "1"]),
        ("heldout", 200, 1, []),
    ):
        if not (out / "pickapic" / name).is_dir():
            make_pickapic.main(
                ["--out", str(out / "pickapic" / name), "--pairs", str(n), "--seed", str(seed), *bad]
            )
        _run(
            [
                py,
                "-m",
                "stages.encode",
                "--config",
                "configs/encode/tiny.yaml",
                f"model.path={model}",
                f"data.source={out / 'pickapic' / name}",
                f"output.dir={out / 'shards' / name}",
            ]
        )
    runs = {}
    # robust_dpo_guess: Robust-DPO at eps 0.4 whatever the true rate, the best objective found that is
    # not told it (FINDINGS.md, "Without redundancy"); the report's audit lists the annotators it doubts
    for name in ("dpo", "adaptive_dpo", "robust_dpo_guess"):
        run = out / "runs" / name
        _run(
            [
                py,
                "-m",
                "stages.train",
                "--config",
                f"configs/train/tiny_{name}.yaml",
                f"data.shards={out / 'shards' / 'train'}",
                f"output.dir={run}",
                f"train.max_steps={a.steps}",
                "data.micro_batch=8",
                f"data.flip_rate={a.flip_rate}",
                f"checkpoint.every={a.steps}",
            ]
        )
        runs[name] = run
    report = out / "report"
    _run(
        [
            py,
            "-m",
            "stages.evaluate",
            "--config",
            "configs/eval/tiny.yaml",
            f"output={report}",
            *[f"models.unets.{k}={v}" for k, v in runs.items()],
            f"preference.shards={out / 'shards' / 'heldout'}",
            "generation.prompts=prompts/toy.txt",
            *[f"minority.runs.{k}={v}" for k, v in runs.items()],
        ]
    )
    print(
        f"\ndemo done: report {report / 'report.md'}, plots {report}/*.png, images {report / 'images'}, runs {out / 'runs'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
