"""Does D3PO's online loop move the reward it is fed, and the other way when the reward is negated?

    python -m tools.d3po_study --out d3po_study [--seeds 0 1 2] [--rounds 4] [--steps-per-round 10]

On the tiny model (its VAE first trained as an autoencoder, ``tools.make_tiny_model --vae-steps``, so
that decoded images depend on the latents), runs ``stages.online`` with the brightness reward and
with its negation (``-brightness``), once per seed (the loop's ``seed``: every sampled noise differs),
two loops at a time. Each loop's evaluation samples the same prompts from the same noise every round,
so only the policy changes. Writes ``study.json`` (every round's eval mean of every run, and per
reward the change from the base over seeds: mean ± s.e.) and ``study.png``. A rerun skips finished
loops (each loop is itself resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_loop(model: Path, out: Path, reward: str, seed: int, a) -> dict:
    if not (out / "report.json").is_file():
        cmd = [sys.executable, "-m", "stages.online", "--config", "configs/online/tiny.yaml", f"model.path={model}",
               f"out={out}", f"rounds={a.rounds}", f"steps_per_round={a.steps_per_round}", f"seed={seed}",
               f"sample_overrides=[prompts.max={a.prompts}]", f"feedback_overrides=[\"rewards=[{reward}]\"]",
               f"train_overrides=[data.micro_batch=2,train.grad_accum=4,checkpoint.every=5,optim.lr={a.lr}]"]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        with open(out.with_suffix(".log"), "w") as log:
            p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}); see {out.with_suffix('.log')}")
    report = json.loads((out / "report.json").read_text())
    # the loop scores its evaluation with the reward it is fed (-brightness: minus the brightness);
    # the study compares brightness itself in both arms
    sign = -1.0 if reward.startswith("-") else 1.0
    return {r["round"]: sign * r["eval"][reward]["mean"] for r in report["rounds"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.d3po_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="d3po_study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps-per-round", type=int, default=10)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-steps", type=int, default=300)
    a = p.parse_args(argv)
    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "model_index.json").is_file():
        from tools.make_tiny_model import make_tiny_model

        make_tiny_model("sd15", model, seed=0, vae_steps=a.vae_steps)
    jobs = [(reward, seed) for seed in a.seeds for reward in ("brightness", "-brightness")]
    with ThreadPoolExecutor(2) as pool:
        futures = {
            job: pool.submit(run_loop, model, out / "runs" / f"{job[0]}_s{job[1]}", *job, a) for job in jobs
        }
        curves = {f"{r}_s{s}": f.result() for (r, s), f in futures.items()}
    summary = {}
    for reward in ("brightness", "-brightness"):
        deltas = np.array(
            [curves[f"{reward}_s{s}"][a.rounds - 1] - curves[f"{reward}_s{s}"][-1] for s in a.seeds]
        )
        summary[reward] = {
            "change_in_brightness_after_last_round": {
                "mean": float(deltas.mean()),
                "se": float(deltas.std(ddof=1) / np.sqrt(len(deltas))) if len(deltas) > 1 else float("nan"),
                "per_seed": deltas.tolist(),
            }
        }
    result = {"args": vars(a), "eval_brightness_by_round": curves, "summary": summary}
    (out / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(curves, a, out / "study.png")
    print("reward fed     | eval brightness change, base -> last round (mean ± s.e. over seeds) | per seed")
    for reward, s in summary.items():
        c = s["change_in_brightness_after_last_round"]
        print(
            f"{reward:14s} | {c['mean']:+.4f} ± {c['se']:.4f} | {', '.join(f'{d:+.4f}' for d in c['per_seed'])}"
        )
    print(f"-> {out / 'study.json'}, {out / 'study.png'}")
    return 0


def _plot(curves: dict, a, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = list(range(-1, a.rounds))
    for reward, colour in (("brightness", "tab:orange"), ("-brightness", "tab:blue")):
        ys = np.array([[curves[f"{reward}_s{s}"][r] for r in rounds] for s in a.seeds])
        se = ys.std(axis=0, ddof=1) / np.sqrt(len(a.seeds)) if len(a.seeds) > 1 else np.zeros(len(rounds))
        x = [r + 1 for r in rounds]
        for y in ys:
            ax.plot(x, y, color=colour, alpha=0.25, lw=1)
        ax.errorbar(x, ys.mean(axis=0), yerr=se, color=colour, lw=2, capsize=3, label=f"fed {reward}")
    ax.set_xlabel("rounds of D3PO trained (0 = the base model)")
    ax.set_ylabel("eval brightness (fixed prompts and noise)")
    ax.set_title(f"D3PO online loop, tiny model, {len(a.seeds)} seeds (thin: each seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
