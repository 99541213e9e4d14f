"""Robustness benchmark: the Adaptive-DPO paper's Table 2 at toy scale, on a CPU.

    python -m tools.robustness [--out robustness] [--pairs 4000] [--heldout 500] [--steps 200] \
        [--seeds 0 1 2] [--flip-rates 0 0.1 0.2 0.3] [--objectives dpo adaptive_dpo robust_dpo sft] [--jobs 2]

The toy world (tools.make_pickapic): each caption names a colour and the image dominated by that
colour is truly better; annotators follow the truth. For every flip rate, objective and seed, the
tiny model is trained with the same budget (``--steps`` optimizer steps of ``--micro-batch`` pairs)
on training labels flipped at that rate (Robust-DPO is told eps = the flip rate), then the implicit
classifier of the exported policy is evaluated against the *true* preference on held-out pairs that
no run trained on (fixed timesteps and noises, identical for every model). Every run is the real
``python -m stages.train`` command; finished runs are skipped, so the benchmark resumes after a kill.

Writes ``OUT/results.json``, ``OUT/table.md`` (mean ± std over seeds) and ``OUT/accuracy_vs_flip.png``.
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
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "adaptive_dpo": "configs/train/tiny_adaptive_dpo.yaml",
    "adaptive_ipo": "configs/train/tiny_adaptive_dpo.yaml",
}


def _env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def prepare(out: Path, pairs: int, heldout: int) -> tuple[Path, Path, Path]:
    from stages import encode
    from tools.make_pickapic import make_rows, write_parquet
    from tools.make_tiny_model import make_tiny_model

    model = out / "model"
    if not (model / "model_index.json").is_file():
        make_tiny_model("sd15", model, seed=0, vae_steps=300)  # a VAE whose latents carry the images
    shards = {}
    for name, n, seed in (("train", pairs, 100), ("heldout", heldout, 200)):
        src, dst = out / "data" / name, out / "shards" / name
        if not src.is_dir():
            write_parquet(
                make_rows(n, seed=seed, tie_rate=0, unlabelled_rate=0, identical_rate=0),
                src,
                rows_per_file=1000,
            )
        if not (dst / "manifest.json").is_file():
            rc = encode.cli_main(
                [
                    "--config",
                    "configs/encode/tiny.yaml",
                    f"model.path={model}",
                    f"data.source={src}",
                    f"output.dir={dst}",
                    "output.shard_size=250",
                ]
            )
            if rc:
                raise SystemExit(rc)
        shards[name] = dst
    return model, shards["train"], shards["heldout"]


def run_name(obj: str, rate: float, seed: int) -> str:
    return f"{obj}_f{int(round(rate * 100)):02d}_s{seed}"


def train_one(args, shards: Path, obj: str, rate: float, seed: int, extra: list[str]) -> tuple[str, int, str]:
    run = args.out / "runs" / run_name(obj, rate, seed)
    if (run / "export" / "unet").is_dir():
        return run.name, 0, ""
    cfg = CONFIG.get(obj, "configs/train/tiny_dpo.yaml")
    cmd = [sys.executable, "-m", "stages.train", "--config", cfg, f"data.shards={shards}", f"output.dir={run}",
           f"objective.name={obj}", f"data.flip_rate={rate}", f"data.flip_seed={seed}", f"data.seed={seed}",
           f"train.seed={seed}", f"train.max_steps={args.steps}", f"data.micro_batch={args.micro_batch}",
           f"optim.lr={args.lr}", f"checkpoint.every={args.steps}", "checkpoint.keep=1", "output.tensorboard=false",
           "data.num_workers=0", *extra]  # fmt: skip
    if obj in ("robust_dpo", "cdpo"):
        cmd.append(f"objective.eps={rate}")
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    return run.name, p.returncode, p.stderr[-3000:]


def evaluate(args, model: Path, heldout: Path, names: list[str]) -> dict[str, dict]:
    from pipeline.data.shards import load_manifest
    from pipeline.evaluate.minority_report import latest_per_pair
    from pipeline.evaluate.preference import accuracy, implicit_margins, iter_pairs
    from pipeline.metrics_log import read_pair_records
    from pipeline.minority import auroc
    from pipeline.models import inspect_model, load_scheduler, load_unet

    info = inspect_model(model)
    manifest = load_manifest(heldout)
    samples = list(iter_pairs(heldout))
    truth = np.array(
        [float((s["meta"]["winner"] == 0) == (s["meta"]["extra"]["true_label_0"] == 1.0)) for s in samples]
    )
    ref = load_unet(info.path).eval()
    sched = load_scheduler(info)
    cache_path = args.out / "eval_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    for name in tqdm(names, desc="evaluate", unit="run"):
        if name in cache:
            continue
        run = args.out / "runs" / name
        pol = load_unet(str(run / "export" / "unet"), subfolder=None).eval()
        h = implicit_margins(
            {"p": pol},
            ref,
            samples,
            manifest,
            sched,
            info.prediction_type,
            torch.device("cpu"),
            draws=args.draws,
        )["p"]
        res = {"accuracy_true": accuracy(h, truth), "mean_h": float(h.mean())}
        table = read_pair_records(run)
        if table is not None:
            rec = latest_per_pair(table)
            fl = rec["flipped"]
            if fl.any() and (~fl).any():
                if "h" in rec:
                    res["auroc_neg_h"] = auroc(-rec["h"], fl)
                if "u" in rec and np.isfinite(rec["u"]).any():
                    ok = np.isfinite(rec["u"])
                    res["auroc_u"] = auroc(rec["u"][ok], fl[ok])
                    res["W_flipped"] = float(np.nanmean(rec["W"][fl]))
                    res["W_clean"] = float(np.nanmean(rec["W"][~fl]))
        cache[name] = res
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache


def summarise(args, results: dict[str, dict]) -> dict:
    table = {}
    for obj in args.objectives:
        for rate in args.flip_rates:
            vals = [results[run_name(obj, rate, s)] for s in args.seeds if run_name(obj, rate, s) in results]
            acc = np.array([v["accuracy_true"] for v in vals])
            row = {"accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else float("nan"),
                   "seeds": len(acc), "per_seed": acc.tolist()}  # fmt: skip
            for k in ("auroc_u", "auroc_neg_h", "W_flipped", "W_clean"):
                xs = [v[k] for v in vals if k in v]
                if xs:
                    row[k] = float(np.mean(xs))
            table[f"{obj}@{rate:g}"] = row
    return table


def write_outputs(args, table: dict) -> None:
    rates = args.flip_rates
    lines = [
        "| objective | " + " | ".join(f"flip {r:.0%}" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for obj in args.objectives:
        cells = []
        for r in rates:
            row = table[f"{obj}@{r:g}"]
            cells.append(f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f}")
        lines.append(f"| {obj} | " + " | ".join(cells) + " |")
    extra = [
        "",
        "| objective @ flip | AUROC of u vs flips | AUROC of -h vs flips | mean W flipped / clean |",
        "|---|---|---|---|",
    ]
    for key, row in table.items():
        if "auroc_neg_h" in row:
            w = f"{row['W_flipped']:.3f} / {row['W_clean']:.3f}" if "W_flipped" in row else "-"
            extra.append(
                f"| {key} | {row.get('auroc_u', float('nan')):.3f} | {row['auroc_neg_h']:.3f} | {w} |"
            )
    md = "\n".join(lines + extra) + "\n"
    (args.out / "table.md").write_text(md)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "table": table,
            },
            indent=1,
        )
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for obj in args.objectives:
        m = [table[f"{obj}@{r:g}"]["accuracy_mean"] for r in rates]
        s = [table[f"{obj}@{r:g}"]["accuracy_std"] for r in rates]
        ax.errorbar(
            [100 * r for r in rates],
            m,
            yerr=[0 if np.isnan(x) else x for x in s],
            marker="o",
            capsize=3,
            label=obj,
        )
    ax.axhline(0.5, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("training labels flipped (%)")
    ax.set_ylabel("held-out accuracy vs true preference")
    ax.set_title(
        f"tiny model, {args.pairs} pairs, {args.steps} steps x {args.micro_batch}, {len(args.seeds)} seeds (mean ± std)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "accuracy_vs_flip.png", dpi=120)
    plt.close(fig)
    print(md)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'results.json'}, {args.out / 'accuracy_vs_flip.png'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.robustness", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("robustness"))
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--flip-rates", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--objectives", nargs="+", default=["dpo", "adaptive_dpo", "robust_dpo", "sft"])
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (one CPU thread each)")
    p.add_argument("--extra", nargs="*", default=[], help="key=value overrides for every training run")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    model, train_shards, heldout = prepare(a.out, a.pairs, a.heldout)
    jobs = [(o, r, s) for o in a.objectives for r in a.flip_rates for s in a.seeds]
    failed = []
    with ThreadPoolExecutor(a.jobs) as pool, tqdm(total=len(jobs), desc="train", unit="run") as bar:
        for name, rc, err in pool.map(lambda j: train_one(a, train_shards, *j, a.extra), jobs):
            bar.update(1)
            if rc:
                failed.append(name)
                print(f"\n{name} failed (exit {rc}):\n{err}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} runs failed: {failed}", file=sys.stderr)
        return 1
    results = evaluate(a, model, heldout, [run_name(*j) for j in jobs])
    write_outputs(a, summarise(a, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
