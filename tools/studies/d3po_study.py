"""Does D3PO's online loop move the reward it is fed (and the other way when it is negated), and how do
D3PO and Adaptive-D3PO fare when part of the feedback is flipped?

    python -m tools.studies.d3po_study reward --out d3po_study [--seeds 0 1 2] [--rewards brightness jpeg_compressibility]
    python -m tools.studies.d3po_study flips  --out d3po_flips [--seeds 0 1 2] [--flip-rate 0.25] [--rewards ...]
    ... [--model-seed 7] [--prompt-seed 7]   (another tiny model, other prompts: loop seeds on one model are one model)
    ... [--lr 1e-3] [--train-overrides objective.d3po.eps=0.3 ...]   (a setting to sweep)
    python -m tools.studies.d3po_study expressivity --out d3po_study   (after ``reward``: can the model show it?)

Both run ``stages.online`` on the tiny model (its VAE first trained as an autoencoder,
``tools.toy.make_tiny_model --vae-steps``, so that decoded images depend on the latents), two loops at a
time, each loop on one thread. The training prompts (``--prompts``, sampled afresh every round) and
the evaluation prompts (``--eval-prompts``, the same noise every round, so only the policy changes)
are disjoint random captions of the toy vocabulary, written to ``<out>/prompts_{train,eval}.txt``.
Every loop's evaluation scores every reward of ``--rewards``.

``reward``: per reward, a loop fed the reward and one fed its negation, and per seed one control loop
fed ``random`` (a coin toss per pair from the image's hash): the drift that training alone causes.
``flips``: per reward, ``--flip-rate`` of the decided pairs reversed afresh every round, trained with
each of ``--objectives`` (``d3po``; ``adaptive_d3po``: configs/train/tiny_adaptive_d3po.yaml, the
paper's score u = s c; ``adaptive_d3po_c``: the same with u = c, the models' agreement alone).

The figure of merit is the change of the evaluation's mean reward from the base model to the last
round, per seed, then mean ± s.e. over seeds; ``reward`` also gives each arm minus the control, paired
by seed. Writes ``study.json`` and ``study.png``; a rerun skips finished loops (each is resumable).
The settings (lr, micro-batch, steps, prompts) were chosen on ``brightness``; ``jpeg_compressibility``
is the held-out reward.
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

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "d3po": ("configs/train/tiny_d3po.yaml", []),
    "adaptive_d3po": ("configs/train/tiny_adaptive_d3po.yaml", []),
    "adaptive_d3po_c": ("configs/train/tiny_adaptive_d3po.yaml", ["objective.adaptive.score=c"]),
}


def write_prompts(out: Path, n_train: int, n_eval: int, seed: int = 0) -> tuple[Path, Path]:
    from tools.toy.vocabulary import ADJECTIVES, COLOURS, STYLES, SUBJECTS

    rng = np.random.default_rng(seed)
    caps: set[str] = set()
    while len(caps) < n_train + n_eval:
        caps.add(
            f"a {rng.choice(ADJECTIVES)} {rng.choice(COLOURS)} {rng.choice(SUBJECTS)}, {rng.choice(STYLES)}"
        )
    order = sorted(caps)
    rng.shuffle(order)
    train, ev = out / "prompts_train.txt", out / "prompts_eval.txt"
    train.write_text("\n".join(order[:n_train]) + "\n")
    ev.write_text("\n".join(order[n_train:]) + "\n")
    return train, ev


def run_loop(out: Path, reward: str, seed: int, a, variant: str = "d3po", flip_rate: float = 0.0) -> dict:
    """One online loop; returns {reward: {round: eval mean}} for every reward of --rewards, and the
    training metrics of its last logged step."""
    train_cfg, extra = VARIANTS[variant]
    if not (out / "report.json").is_file():
        feedback = [f"rewards=[{reward}]", f"flip_seed={1000 * seed}"]
        if flip_rate:
            feedback.append(f"flip_rate={flip_rate}")
        train = [
            f"data.micro_batch={a.micro_batch}",
            "train.grad_accum=4",
            f"checkpoint.every={a.steps_per_round}",
            f"optim.lr={a.lr}",
            *extra,
            *a.train_overrides,
        ]
        cmd = [
            sys.executable,
            "-m",
            "stages.online",
            "--config",
            "configs/online/tiny.yaml",
            f"model.path={a.model}",
            f"out={out}",
            f"prompts={a.prompt_files[0]}",
            f"eval.prompts={a.prompt_files[1]}",
            f"eval.rewards=[{','.join(a.rewards)}]",
            f"rounds={a.rounds}",
            f"steps_per_round={a.steps_per_round}",
            f"seed={1000 * seed}",
            f"sample_overrides=[prompts.max={a.prompts}]",
            f"train_config={train_cfg}",
            "feedback_overrides=[" + ",".join(json.dumps(x) for x in feedback) + "]",
            f"train_overrides=[{','.join(train)}]",
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        with open(out.with_suffix(".log"), "w") as log:
            p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}); see {out.with_suffix('.log')}")
    report = json.loads((out / "report.json").read_text())
    curves = {n: {r["round"]: r["eval"][n]["mean"] for r in report["rounds"]} for n in a.rewards}
    last = {}
    for line in (out / "run" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        last.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
    return {"eval": curves, "last_metrics": last}


def mean_se(x) -> dict:
    x = np.asarray(x, dtype=float)
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"mean": float(x.mean()), "se": se, "per_seed": x.tolist()}


def change(result: dict, reward: str, rounds: int) -> float:
    """Eval mean of ``reward`` after the last round minus the base model's (same prompts and noise)."""
    c = result["eval"][reward]
    return c[rounds - 1] - c[-1]


def reward_study(a, out: Path) -> dict:
    jobs = [(f"{arm}{r}_s{s}", arm + r, s) for s in a.seeds for r in a.rewards for arm in ("", "-")]
    jobs += [(f"random_s{s}", "random", s) for s in a.seeds]
    with ThreadPoolExecutor(2) as pool:
        futs = {name: pool.submit(run_loop, out / "runs" / name, rw, s, a) for name, rw, s in jobs}
        runs = {name: f.result() for name, f in futs.items()}
    summary = {}
    for r in a.rewards:
        ctrl = np.array([change(runs[f"random_s{s}"], r, a.rounds) for s in a.seeds])
        row = {"control_random": mean_se(ctrl)}
        for arm, label in (("", "fed"), ("-", "fed_negated")):
            d = np.array([change(runs[f"{arm}{r}_s{s}"], r, a.rounds) for s in a.seeds])
            row[label] = mean_se(d)
            row[f"{label}_minus_control"] = mean_se(d - ctrl)
        summary[r] = row
    print(
        f"change of the eval reward, base -> after round {a.rounds} (mean ± s.e. over {len(a.seeds)} seeds)"
    )
    for r, row in summary.items():
        for k, v in row.items():
            print(
                f"  {r:22s} {k:26s} {v['mean']:+.4f} ± {v['se']:.4f}   per seed {np.round(v['per_seed'], 4).tolist()}"
            )
    _plot(
        runs,
        a,
        out / "study.png",
        [
            ("", "fed {r}", "tab:orange"),
            ("-", "fed -{r}", "tab:blue"),
            (None, "fed random (control)", "tab:gray"),
        ],
    )
    return {"runs": runs, "summary": summary}


def flip_study(a, out: Path) -> dict:
    jobs = [(f"{v}_{r}_s{s}", r, s, v) for s in a.seeds for r in a.rewards for v in a.objectives]
    with ThreadPoolExecutor(2) as pool:
        futs = {n: pool.submit(run_loop, out / "runs" / n, r, s, a, v, a.flip_rate) for n, r, s, v in jobs}
        runs = {n: f.result() for n, f in futs.items()}
    summary = {}
    for r in a.rewards:
        row = {}
        for v in a.objectives:
            res = [runs[f"{v}_{r}_s{s}"] for s in a.seeds]
            row[v] = {"change": mean_se([change(x, r, a.rounds) for x in res])}
            for k in ("auroc_u_window", "W_flipped", "W_clean", "accuracy_flipped", "accuracy_clean"):
                vals = [x["last_metrics"].get(k) for x in res]
                if all(isinstance(x, float) for x in vals):
                    row[v][k] = mean_se(vals)
        if "d3po" in a.objectives:
            base = np.array(row["d3po"]["change"]["per_seed"])
            for v in a.objectives:
                if v != "d3po":
                    row[v]["change_minus_d3po"] = mean_se(np.array(row[v]["change"]["per_seed"]) - base)
        summary[r] = row
    print(
        f"{a.flip_rate:.0%} of the feedback flipped; change of the eval reward, base -> after round {a.rounds}"
    )
    for r, row in summary.items():
        for v, m in row.items():
            extra = "  ".join(f"{k} {x['mean']:.3f} ± {x['se']:.3f}" for k, x in m.items() if k != "change")
            c = m["change"]
            print(f"  {r:22s} {v:16s} {c['mean']:+.4f} ± {c['se']:.4f}  {extra}")
    _plot(
        runs,
        a,
        out / "study.png",
        [(v, v, col) for v, col in zip(a.objectives, ("tab:blue", "tab:orange", "tab:green"))],
        flips=True,
    )
    return {"runs": runs, "summary": summary}


def _cv_r2(x: np.ndarray, y: np.ndarray, intercept: bool, folds: int = 5) -> float:
    """Out-of-fold R^2 of a least-squares linear fit of y on x (seeded folds)."""
    a = np.c_[x, np.ones(len(x))] if intercept else x
    pred = np.zeros(len(y))
    for f in np.array_split(np.random.default_rng(0).permutation(len(y)), folds):
        train = np.setdiff1d(np.arange(len(y)), f)
        coef, *_ = np.linalg.lstsq(a[train], y[train], rcond=None)
        pred[f] = a[f] @ coef
    base = y - y.mean() if intercept else y
    return float(1 - ((pred - y) ** 2).sum() / (base**2).sum())


def expressivity(out: Path) -> dict:
    """Can a policy push this model's samples along the reward? From a finished reward study's round-0
    samples (the base model's, the same for every arm of a loop seed), per loop seed of the fed arm:
    brightness (the reward module's) of every image, its spread within each group (the best-of-K
    signal D3PO learns from), and how much of it a linear function of the final latent's 4 channel
    means explains (5-fold cross-validated R^2, over images and over the differences within pairs)."""
    import io
    import tarfile

    from PIL import Image

    from pipeline.d3po.rewards import brightness

    means, values, gaps, d_means, d_values = [], [], [], [], []
    for loop in sorted((out / "runs").glob("brightness_s*")):
        for shard in sorted((loop / "round_000" / "sample").glob("shard-*.tar")):
            with tarfile.open(shard) as t:
                files = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
            for key in sorted({n.split(".")[0] for n in files if n.endswith(".latents.npy")}):
                lat = np.load(io.BytesIO(files[f"{key}.latents.npy"])).astype(np.float64)  # K, N+1, C, h, w
                imgs = [Image.open(io.BytesIO(files[f"{key}.img{i}.jpg"])) for i in range(len(lat))]
                b, m = brightness(imgs), lat[:, -1].mean(axis=(2, 3))
                means += list(m)
                values += list(b)
                gaps.append(float(b.max() - b.min()))
                d_means += [m[i] - m[0] for i in range(1, len(b))]
                d_values += [b[i] - b[0] for i in range(1, len(b))]
    if not values:
        raise SystemExit(
            f"{out}/runs/brightness_s*/round_000/sample: no samples (run the reward study first)"
        )
    y, dy = np.array(values), np.array(d_values)
    res = {
        "images": len(y),
        "groups": len(gaps),
        "brightness_sd": float(y.std()),
        "best_of_k_gap_mean": float(np.mean(gaps)),
        "r2_channel_means": _cv_r2(np.array(means), y, intercept=True),
        "r2_within_pairs": _cv_r2(np.array(d_means), dy, intercept=False),
    }
    (out / "expressivity.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return res


def _plot(runs: dict, a, path: Path, arms: list, flips: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(a.rewards), figsize=(5.5 * len(a.rewards), 4), squeeze=False)
    rounds = list(range(-1, a.rounds))
    x = [r + 1 for r in rounds]
    for ax, r in zip(axes[0], a.rewards):
        for arm, label, colour in arms:
            if flips:
                names = [f"{arm}_{r}_s{s}" for s in a.seeds]
            else:
                names = [f"random_s{s}" if arm is None else f"{arm}{r}_s{s}" for s in a.seeds]
            ys = np.array([[runs[n]["eval"][r][k] for k in rounds] for n in names])
            se = ys.std(axis=0, ddof=1) / np.sqrt(len(ys)) if len(ys) > 1 else np.zeros(len(rounds))
            for y in ys:
                ax.plot(x, y, color=colour, alpha=0.25, lw=1)
            ax.errorbar(x, ys.mean(axis=0), yerr=se, color=colour, lw=2, capsize=3, label=label.format(r=r))
        ax.set_xlabel("rounds trained (0 = the base model)")
        ax.set_ylabel(f"eval {r} (fixed prompts and noise)")
        ax.legend(fontsize=8)
    title = f"{a.flip_rate:.0%} of feedback flipped, " if flips else ""
    fig.suptitle(
        f"D3PO online loop, tiny model, {title}\n{len(a.seeds)} seeds (thin: each seed, bars: s.e.)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.studies.d3po_study", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("study", choices=("reward", "flips", "expressivity"))
    p.add_argument("--out", default="d3po_study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rewards", nargs="+", default=["brightness", "jpeg_compressibility"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps-per-round", type=int, default=8)
    p.add_argument("--prompts", type=int, default=64, help="training prompts (one pair each, K=2)")
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--flip-rate", type=float, default=0.25)
    p.add_argument("--objectives", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--model-seed", type=int, default=0, help="the tiny model's seed: another seed is another model"
    )
    p.add_argument("--prompt-seed", type=int, default=0, help="which random captions are the prompts")
    p.add_argument(
        "--train-overrides",
        nargs="*",
        default=[],
        help="more stages.train overrides for every loop, e.g. objective.d3po.eps=0.3 model.lora_rank=4",
    )
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    if a.study == "expressivity":
        expressivity(out)
        return 0
    (out / "runs").mkdir(parents=True, exist_ok=True)
    a.model = out / "model"
    if not (a.model / "model_index.json").is_file():
        from tools.toy.make_tiny_model import make_tiny_model

        make_tiny_model("sd15", a.model, seed=a.model_seed, vae_steps=a.vae_steps)
    a.prompt_files = write_prompts(out, a.prompts, a.eval_prompts, a.prompt_seed)
    result = reward_study(a, out) if a.study == "reward" else flip_study(a, out)
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "prompt_files"}
    (out / "study.json").write_text(json.dumps({"args": args, **result}, indent=1) + "\n")
    print(f"-> {out / 'study.json'}, {out / 'study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
