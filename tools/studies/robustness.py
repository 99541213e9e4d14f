"""Robustness benchmarks on the toy world, on a CPU: every run is the real ``python -m stages.train``.

    python -m tools.studies.robustness --preset table2   [--out robustness]       # the paper's Table 2, toy scale
    python -m tools.studies.robustness --preset minority [--out minority_study]   # does u find the minority?

The toy world (tools.toy.make_pickapic, ``brightness``): the brighter image is truly better; annotators
follow the truth. For every variant, flip setting and seed, the tiny model is trained with the same
budget (``--steps`` optimizer steps of ``--micro-batch`` pairs) on training labels flipped per the
setting (``pair:0.3``: 30 % of pairs; ``user:0.3``: every label of 30 % of the annotators), then the
implicit classifier of the exported policy is evaluated against the *true* preference on held-out
pairs no run trained on (fixed timesteps and noises, identical for every model; the reference's
forwards are shared). The ``minority`` preset also evaluates the intermediate checkpoints
(accuracy against steps) and reads each run's per-pair records: AUROC of u and of -h against the
flips, mean W on flipped vs clean pairs, and with annotator flips the AUROC over annotators.
Finished runs and evaluations are skipped: the benchmark resumes after a kill.

Outputs in OUT: ``results.json``, ``table.md`` (mean ± std over seeds), ``accuracy_vs_flip.png``
(table2) or ``accuracy_vs_steps.png`` (minority).
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

ROOT = Path(__file__).resolve().parents[2]
DPO_CFG, ADA_CFG = "configs/train/tiny_dpo.yaml", "configs/train/tiny_adaptive_dpo.yaml"

# name -> (config file, overrides, options). eps_from_flip: eps = the flip rate; lr_from: lr x mean W of that variant
VARIANTS: dict[str, tuple[str, list[str], dict]] = {
    "dpo": (DPO_CFG, ["objective.name=dpo"], {}),
    "adaptive_dpo": (
        ADA_CFG,
        [],
        {},
    ),  # the paper's settings: variance spread, rho 15, k1 10, EMA 0.9999 / 0.5
    "robust_dpo": (DPO_CFG, ["objective.name=robust_dpo"], {"eps_from_flip": True}),
    "cdpo": (DPO_CFG, ["objective.name=cdpo"], {"eps_from_flip": True}),
    "sft": (DPO_CFG, ["objective.name=sft"], {}),
    "bounded_dpo": (DPO_CFG, ["objective.name=bounded_dpo", "objective.bounded_k=1.0"], {}),
    "dpo_lr_meanW": (DPO_CFG, ["objective.name=dpo"], {"lr_from": "adaptive_dpo"}),
    "adaptive_std": (ADA_CFG, ["objective.adaptive.spread=std_clamped"], {}),
    "adaptive_std_norm": (
        ADA_CFG,
        ["objective.adaptive.spread=std_clamped", "objective.adaptive.normalize=true"],
        {},
    ),
    "adaptive_renorm": (ADA_CFG, ["objective.adaptive.renormalize=true"], {}),
    "adaptive_c_only": (ADA_CFG, ["objective.adaptive.score=c"], {}),
    "adaptive_s_only": (ADA_CFG, ["objective.adaptive.score=s"], {}),
    "adaptive_halflife": (ADA_CFG, ["ema.decays=[]", "ema.half_lives=[50,5]"], {}),
    "adaptive_logit": (ADA_CFG, ["objective.adaptive.g_scale=logit"], {}),
    "dpo_lr_meanW_logit": (DPO_CFG, ["objective.name=dpo"], {"lr_from": "adaptive_logit"}),
    "adaptive_standardized": (
        ADA_CFG,
        ["objective.adaptive.g_scale=standardized", "objective.adaptive.rho=1.0"],
        {},
    ),
    "adaptive_logit_c": (ADA_CFG, ["objective.adaptive.g_scale=logit", "objective.adaptive.score=c"], {}),
    "adaptive_logit_c_renorm": (
        ADA_CFG,
        [
            "objective.adaptive.g_scale=logit",
            "objective.adaptive.score=c",
            "objective.adaptive.renormalize=true",
        ],
        {},
    ),
    # Robust-DPO's gradient at eps 0.3 is 1/(1 - 2 eps) = 2.5x DPO's at h = 0: is its gain the step size?
    "dpo_lr_x2.5": (DPO_CFG, ["objective.name=dpo"], {"lr_scale": 2.5}),
    # no flip rate given: the rates are estimated during training (pipeline/losses/noise_model.py);
    # em_dpo's default loss is Robust-DPO's at the estimated global rate, the posterior form uses q
    "em_dpo": ("configs/train/tiny_em_dpo.yaml", [], {}),
    "em_dpo_posterior": ("configs/train/tiny_em_dpo.yaml", ["objective.noise.loss=posterior"], {}),
    "em_dpo_posterior_global": (
        "configs/train/tiny_em_dpo.yaml",
        ["objective.noise.loss=posterior", "objective.noise.per_annotator=false"],
        {},
    ),
    "adaptive_logit_halflife_renorm": (
        ADA_CFG,
        [
            "objective.adaptive.g_scale=logit",
            "ema.decays=[]",
            "ema.half_lives=[50,5]",
            "objective.adaptive.renormalize=true",
        ],
        {},
    ),
}
PRESETS = {
    "table2": {
        "variants": ["dpo", "adaptive_dpo", "robust_dpo", "sft"],
        "flips": ["pair:0", "pair:0.1", "pair:0.2", "pair:0.3"],
        "seeds": [0, 1, 2],
        "curve": False,
    },
    "minority": {
        "variants": list(VARIANTS),
        "flips": ["pair:0.3", "user:0.3"],
        "seeds": [0, 1, 2],
        "curve": True,
    },
}


def _env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def parse_flip(flip: str) -> tuple[str, float]:
    by, _, rate = flip.partition(":")
    if by not in ("pair", "user", "prompt") or not rate:
        raise SystemExit(f"--flips {flip}: expected pair:RATE, user:RATE or prompt:RATE")
    return by, float(rate)


def run_name(variant: str, flip: str, seed: int) -> str:
    by, rate = parse_flip(flip)
    return f"{variant}_{by}{int(round(rate * 100)):02d}_s{seed}"


def prepare(out: Path, pairs: int, heldout: int, data_seed: int = 0, **world) -> tuple[Path, Path, Path]:
    """``world``: make_rows' world, pairs_per_user, minority_share, minority_rule (the minority labels
    the training pairs only; the held-out pairs are judged by the truth). ``data_seed`` draws another
    training set of the same world (make_rows' seed 100 + data_seed); the held-out pairs stay the same."""
    from stages import encode
    from tools.toy.make_pickapic import annotators, make_rows, write_annotators, write_parquet
    from tools.toy.make_tiny_model import make_tiny_model

    model = out / "model"
    if not (model / "model_index.json").is_file():
        make_tiny_model("sd15", model, seed=0, vae_steps=300)  # a VAE whose latents carry the images
    shards = {}
    for name, n, seed in (("train", pairs, 100 + data_seed), ("heldout", heldout, 200)):
        src, dst = out / "data" / name, out / "shards" / name
        kw = world if name == "train" else {"world": world.get("world", "brightness")}
        info, recorded = annotators(n, seed, **kw), src / "annotators.json"
        if not src.is_dir():
            write_parquet(
                make_rows(n, seed=seed, tie_rate=0, unlabelled_rate=0, identical_rate=0, **kw),
                src,
                rows_per_file=1000,
            )
            write_annotators(info, src)
        elif recorded.is_file() and json.loads(recorded.read_text()) != info:
            raise SystemExit(f"{src} was made for another world or minority: use another --out")
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


def mean_W(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ws = [r["W"] for r in rows if r.get("W") is not None]
    return float(np.mean(ws)) if ws else 1.0


def train_one(a, shards: Path, variant: str, flip: str, seed: int) -> tuple[str, int, str]:
    run = a.out / "runs" / run_name(variant, flip, seed)
    if (run / "export" / "unet").is_dir():
        return run.name, 0, ""
    cfg, overrides, opts = VARIANTS[variant]
    by, rate = parse_flip(flip)
    lr = a.lr * opts.get("lr_scale", 1.0)
    if "lr_from" in opts:
        lr *= mean_W(a.out / "runs" / run_name(opts["lr_from"], flip, seed))
    every = max(a.steps // 4, 1) if a.curve else a.steps
    cmd = [
        sys.executable,
        "-m",
        "stages.train",
        "--config",
        cfg,
        f"data.shards={shards}",
        f"output.dir={run}",
        f"data.flip_rate={rate}",
        f"data.flip_by={by}",
        f"data.flip_seed={seed}",
        f"data.seed={seed}",
        f"train.seed={seed}",
        f"train.max_steps={a.steps}",
        f"data.micro_batch={a.micro_batch}",
        f"optim.lr={lr}",
        f"checkpoint.every={every}",
        "checkpoint.keep=8",
        "output.tensorboard=false",
        "data.num_workers=0",
        *overrides,
        *a.extra,
    ]
    if opts.get("eps_from_flip"):
        cmd.append(f"objective.eps={rate}")
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    return run.name, p.returncode, p.stderr[-3000:]


def train_all(train, phases, workers: int) -> bool:
    """Run ``train(job) -> (name, exit code, stderr)`` over each phase's jobs, ``workers`` at a time, a
    phase starting when the one before it has ended; print every failure. True when none failed."""
    failed = []
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=sum(map(len, phases)), desc="train", unit="run") as bar,
    ):
        for phase in phases:
            for name, rc, err in pool.map(train, phase):
                bar.update(1)
                if rc:
                    failed.append(name)
                    print(f"\n{name} failed (exit {rc}):\n{err}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} runs failed: {failed}", file=sys.stderr)
    return not failed


def _run_stats(run: Path) -> dict:
    """From the run's per-pair records: AUROC of u and -h against the flips, W on flipped vs clean,
    and with annotator flips the AUROC of the annotators' mean score against their flipped flag."""
    from pipeline.evaluate.minority_report import latest_per_pair, per_annotator
    from pipeline.metrics_log import read_pair_records
    from pipeline.minority import auroc

    table = read_pair_records(run)
    res: dict = {}
    if table is None:
        return res
    rec = latest_per_pair(table)
    fl = rec["flipped"]
    if not (fl.any() and (~fl).any()):
        return res
    if "h" in rec:
        res["auroc_neg_h"] = auroc(-rec["h"], fl)
    if "u" in rec and np.isfinite(rec["u"]).any():
        ok = np.isfinite(rec["u"])
        res["auroc_u"] = auroc(rec["u"][ok], fl[ok])
    if "W" in rec:
        res["W_flipped"], res["W_clean"] = float(np.nanmean(rec["W"][fl])), float(np.nanmean(rec["W"][~fl]))
    if "h" not in rec:  # SFT has no preference margin
        return res
    users = per_annotator(rec, 0.9, 1)
    flipped_users = np.array([u["flipped_share"] == 1.0 for u in users])
    clean_users = np.array([u["flipped_share"] == 0.0 for u in users])
    if flipped_users.any() and clean_users.any() and (flipped_users | clean_users).all():
        res["auroc_annotators"] = auroc([u["mean_score"] for u in users], flipped_users)
    return res


def evaluate(a, model: Path, heldout: Path, names: list[str]) -> dict[str, dict]:
    """Held-out accuracy against the truth of every run's export (and checkpoints, with --curve)."""
    from pipeline.data.shards import label_agrees_with_truth, load_manifest
    from pipeline.engine.checkpoint import load_checkpoint_unet
    from pipeline.engine.context import RunContext
    from pipeline.evaluate.preference import HeldOutDraws, accuracy, implicit_margins, iter_pairs
    from pipeline.models import inspect_model, load_scheduler, load_unet

    info = inspect_model(model)
    manifest = load_manifest(heldout)
    samples = list(iter_pairs(heldout))
    truth = np.array([label_agrees_with_truth(s["meta"]) for s in samples])
    ref = load_unet(info.path).eval()
    sched = load_scheduler(info)
    cache_path = a.out / "eval_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    todo = []  # (cache key, loader)
    for name in names:
        run = a.out / "runs" / name
        if name not in cache:
            todo.append((name, lambda r=run: load_unet(str(r / "export" / "unet"), subfolder=None)))
        if a.curve:
            for ck in sorted((run / "checkpoints").glob("step_*")):
                key = f"{name}@{int(ck.name.split('_')[1])}"
                if key not in cache and int(ck.name.split("_")[1]) < a.steps:
                    todo.append((key, lambda ck=ck: load_checkpoint_unet(ck, info.path)))
    pairs = HeldOutDraws(
        samples, manifest, sched, info.prediction_type, RunContext.local(torch.device("cpu")), draws=a.draws
    )
    ref_d = pairs.d(ref)  # once, for every model
    for i in tqdm(range(0, len(todo), 8), desc="evaluate", unit="x8 models"):
        chunk = todo[i : i + 8]
        models = {key: load().eval() for key, load in chunk}
        margins = implicit_margins(models, ref_d, pairs)
        for key in models:
            cache[key] = {
                "accuracy_true": accuracy(margins[key], truth),
                "mean_h": float(margins[key].mean()),
            }
            if "@" not in key:
                cache[key].update(_run_stats(a.out / "runs" / key))
        _merge_cache(cache_path, {key: cache[key] for key in models})
    return cache


def _merge_cache(path: Path, new: dict) -> None:
    """Adds ``new`` to the JSON cache at ``path``: under a lock, re-read, merged, written to a temporary name
    and renamed, so that two studies evaluating in the same folder neither lose each other's entries nor
    read a half-written file."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update(new)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(merged, indent=1))
        os.replace(tmp, path)


def summarise(a, results: dict[str, dict]) -> dict:
    table = {}
    for v in a.variants:
        for flip in a.flips:
            names = [run_name(v, flip, s) for s in a.seeds]
            vals = [results[n] for n in names if n in results]
            acc = np.array([x["accuracy_true"] for x in vals])
            row = {
                "accuracy_mean": float(acc.mean()),
                "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else float("nan"),
                "seeds": len(acc),
                "per_seed": acc.tolist(),
            }
            for k in ("auroc_u", "auroc_neg_h", "W_flipped", "W_clean", "auroc_annotators"):
                xs = [x[k] for x in vals if k in x and np.isfinite(x[k])]
                if xs:
                    row[k] = float(np.mean(xs))
            if a.curve:
                steps = sorted(
                    {int(k.split("@")[1]) for k in results if k.split("@")[0] in names and "@" in k}
                    | {a.steps}
                )
                row["curve"] = {
                    s: float(
                        np.mean([results[f"{n}@{s}" if s < a.steps else n]["accuracy_true"] for n in names])
                    )
                    for s in steps
                }
            table[f"{v}@{flip}"] = row
    return table


def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def write_outputs(a, table: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = "| variant | " + " | ".join(f"acc. {f}" for f in a.flips) + " |"
    lines = [head, "|---|" + "---|" * len(a.flips)]
    for v in a.variants:
        cells = [
            f"{table[f'{v}@{f}']['accuracy_mean']:.3f} ± {_fmt(table[f'{v}@{f}']['accuracy_std'])}"
            for f in a.flips
        ]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    det = [
        "",
        "| variant @ flips | AUROC u | AUROC -h | W flipped / clean | AUROC annotators |",
        "|---|---|---|---|---|",
    ]
    for key, r in table.items():
        if "auroc_neg_h" in r:
            w = f"{r['W_flipped']:.3f} / {r['W_clean']:.3f}" if "W_flipped" in r else "-"
            det.append(
                f"| {key} | {_fmt(r.get('auroc_u'))} | {_fmt(r.get('auroc_neg_h'))} | {w} | {_fmt(r.get('auroc_annotators'))} |"
            )
    md = "\n".join(lines + det) + "\n"
    (a.out / "table.md").write_text(md)
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    (a.out / "results.json").write_text(json.dumps({"args": args, "table": table}, indent=1))
    title = f"tiny model, {a.pairs} pairs, {a.steps} steps x {a.micro_batch} pairs, {len(a.seeds)} seeds (mean ± std)"
    if not a.curve:
        rates = [parse_flip(f)[1] for f in a.flips]
        fig, ax = plt.subplots(figsize=(6, 4))
        for v in a.variants:
            m = [table[f"{v}@{f}"]["accuracy_mean"] for f in a.flips]
            s = [table[f"{v}@{f}"]["accuracy_std"] for f in a.flips]
            ax.errorbar(
                [100 * r for r in rates],
                m,
                yerr=[0 if np.isnan(x) else x for x in s],
                marker="o",
                capsize=3,
                label=v,
            )
        ax.axhline(0.5, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("training labels flipped (%)")
        ax.set_ylabel("held-out accuracy vs true preference")
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.out / "accuracy_vs_flip.png", dpi=120)
    else:
        # up to 40 variants in distinct colours (tab20, then tab20b), dashed for the adaptive family, legend
        # beside the axes
        colours = plt.get_cmap("tab20").colors + plt.get_cmap("tab20b").colors
        fig, axes = plt.subplots(1, len(a.flips), figsize=(5.5 * len(a.flips) + 3, 5), squeeze=False)
        for ax, f in zip(axes[0], a.flips):
            for i, v in enumerate(a.variants):
                c = table[f"{v}@{f}"]["curve"]
                adaptive = v.startswith("adaptive")
                ax.plot(
                    [int(s) for s in c],
                    list(c.values()),
                    marker="o",
                    ms=3,
                    label=v,
                    color=colours[i % len(colours)],
                    ls="--" if adaptive else "-",
                    lw=1.3 if adaptive else 2,
                )
            ax.axhline(0.5, color="gray", ls=":", lw=0.8)
            ax.set_title(f"flips {f}", fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("held-out accuracy vs truth (mean over seeds)")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(title.replace("(mean ± std)", "(mean over seeds)"), fontsize=9)
        fig.tight_layout()
        fig.savefig(a.out / "accuracy_vs_steps.png", dpi=110)
    plt.close("all")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.studies.robustness", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--preset", choices=list(PRESETS), default="table2")
    p.add_argument(
        "--out", type=Path, default=None, help="default: robustness (table2), minority_study (minority)"
    )
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--flips", nargs="+", default=None, help="e.g. pair:0.3 user:0.3")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (one CPU thread each)")
    p.add_argument("--extra", nargs="*", default=[], help="key=value overrides for every training run")
    from tools.toy.make_pickapic import MINORITY_RULES, WORLDS

    p.add_argument(
        "--world", choices=WORLDS, default="brightness", help="toy world (tools.toy.make_pickapic)"
    )
    p.add_argument("--pairs-per-user", type=float, default=6.0, help="training rows per annotator")
    p.add_argument(
        "--minority-share", type=float, default=0.0, help="share of annotators using --minority-rule"
    )
    p.add_argument("--minority-rule", choices=MINORITY_RULES, default=None, help="the taste minority's rule")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    a.variants = a.variants or preset["variants"]
    a.flips = a.flips or preset["flips"]
    a.seeds = a.seeds if a.seeds is not None else preset["seeds"]
    a.curve = preset["curve"]
    a.out = a.out or Path("robustness" if a.preset == "table2" else "minority_study")
    a.out.mkdir(parents=True, exist_ok=True)
    world = {
        "world": a.world,
        "pairs_per_user": a.pairs_per_user,
        "minority_share": a.minority_share,
        "minority_rule": a.minority_rule,
    }
    model, train_shards, heldout = prepare(a.out, a.pairs, a.heldout, **world)
    jobs = [(v, f, s) for v in a.variants for f in a.flips for s in a.seeds]
    later = [j for j in jobs if "lr_from" in VARIANTS[j[0]][2]]  # need their source runs finished
    phases = ([j for j in jobs if j not in later], later)
    if not train_all(lambda j: train_one(a, train_shards, *j), phases, a.jobs):
        return 1
    results = evaluate(a, model, heldout, [run_name(*j) for j in jobs])
    md = write_outputs(a, summarise(a, results))
    print(md)
    print(f"wrote {a.out}/table.md, results.json and the plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
