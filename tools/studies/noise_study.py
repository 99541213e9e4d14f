"""Robust to minorities without an oracle? Every objective, on several toy worlds and minority structures,
with one world held out: settings are chosen on the others, the held-out one is reported apart.

    python -m tools.studies.noise_study [--out noise_study] [--worlds brightness daynight] [--heldout warmth]
        [--structures none pair:0.3 user:0.3 taste:0.3] [--variants dpo robust_dpo em_dpo ...] [--seeds 0 1 2]
        [--data-seeds 0 1]

Worlds (tools.toy.make_pickapic): ``brightness`` (the brighter image is truly better), ``warmth`` (the
redder one, brightness random), ``daynight`` (prompt-dependent: brighter for a day caption, darker
for a night one) and ``green`` (the greener one; added after every setting was fixed, a second
held-out world: ``--heldout green``). Minority structures: ``none``; ``pair:R`` (R of the pairs
flipped at random), ``user:R`` (every label of R of the annotators), ``prompt:R`` (every label of R of
the captions) — the trainer's flips (data.flip_by) — and ``taste:F``: F of the annotators label by another attribute
(WORLD_MINORITY: warmth in the brightness, day/night and green worlds, brightness in the warmth one), not
by the majority's rule reversed; with independent rules about half of their labels disagree with
the truth. Every run is the real ``python -m stages.train`` on the tiny model (3000 training pairs, 20
per annotator, 200 steps x 16 pairs, lr 1e-4), evaluated on 500 held-out pairs against the *true*
preference (tools.studies.robustness.evaluate: the implicit classifier h > 0, 4 fixed noise draws per pair).
``--seeds`` are train seeds (data order, flips, noise); ``--data-seeds`` draw other training sets of each
world (0: the one every earlier study used); the held-out pairs are the same for every data seed.

Per run, from its per-pair records and its last checkpoint: the share of training labels against the
truth ("noisy"), AUROC over pairs of the run's minority score ``u`` (em_dpo: the posterior that the
label is flipped; Adaptive-DPO: its u) and of ``-h`` against "noisy"; where whole annotators are the
minority (``user``, ``taste``), AUROC over annotators of em_dpo's final per-annotator flip rate (other
objectives: the annotator's mean ``u``, else mean ``-h``), and the evaluation report's audit: the
shrunk per-annotator flip rates fitted to the records' margins and to the final policy's margins on
every training pair (``--audit-draws``, cached in each run folder as ``audit_final_dN.parquet``);
em_dpo's final estimated global rate against the true share. ``robust_dpo`` is the oracle: told the true share.

Outputs in OUT: ``results.json`` (every run, every summary), ``table.md`` (mean ± s.e. over seeds,
differences paired by seed), ``accuracy.png``. Finished runs and evaluations are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pipeline.data.annotator_weights import label_counts, write_weights
from pipeline.schema.evaluate import EvalMinority
from tools.studies.robustness import ROOT, _env, prepare, train_all

WORLD_MINORITY = {"brightness": "warmth", "warmth": "brightness", "daynight": "warmth", "green": "warmth"}
CALIBRATED = "configs/train/tiny_adaptive_dpo_calibrated.yaml"
# name -> (config, overrides); robust_dpo gets objective.eps = the run's true noisy share
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dpo": ("configs/train/tiny_dpo.yaml", []),
    "robust_dpo": ("configs/train/tiny_robust_dpo.yaml", []),
    "em_dpo": ("configs/train/tiny_em_dpo.yaml", []),
    "em_dpo_posterior": ("configs/train/tiny_em_dpo.yaml", ["objective.noise.loss=posterior"]),
    # fixed guesses, no oracle: the same eps whatever the data
    "robust_dpo_fixed": ("configs/train/tiny_robust_dpo.yaml", ["objective.eps=0.2"]),
    "robust_dpo_fixed30": ("configs/train/tiny_robust_dpo.yaml", ["objective.eps=0.3"]),
    "robust_dpo_fixed40": ("configs/train/tiny_robust_dpo.yaml", ["objective.eps=0.4"]),
    # + each annotator's labels weigh at most the median annotator's count (data.annotator_weights)
    "robust_dpo_fixed40_balanced": ("configs/train/tiny_robust_dpo.yaml", ["objective.eps=0.4"]),
    "bounded_dpo": ("configs/train/tiny_bounded_dpo.yaml", []),
    "cdpo": ("configs/train/tiny_cdpo.yaml", []),
    "adaptive_calibrated": (CALIBRATED, []),
    "adaptive_paper": ("configs/train/tiny_adaptive_dpo_paper_literal.yaml", []),
    "adaptive_authors_code": ("configs/train/tiny_adaptive_dpo_authors_code.yaml", []),
}


def all_worlds(a) -> list[str]:
    return a.worlds + [w for w in a.heldout if w != "none"]


def parse_structure(s: str) -> tuple[str, float]:
    if s == "none":
        return "none", 0.0
    kind, _, rate = s.partition(":")
    if kind not in ("pair", "user", "prompt", "taste") or not rate:
        raise SystemExit(f"--structures {s}: expected none, pair:R, user:R, prompt:R or taste:F")
    return kind, float(rate)


def slug(structure: str) -> str:
    kind, rate = parse_structure(structure)
    return "none" if kind == "none" else f"{kind}{int(round(rate * 100)):02d}"


def rep_tag(data_seed: int, seed: int) -> str:
    """A run's seeds in its name: s{seed} for data seed 0 (the names every earlier study used)."""
    return f"s{seed}" if data_seed == 0 else f"d{data_seed}_s{seed}"


def data_for(a, world: str, structure: str, data_seed: int = 0) -> tuple[Path, Path, Path]:
    """(model, train shards, held-out shards); the taste minority is its own data set."""
    kind, rate = parse_structure(structure)
    kw = {
        "world": world,
        "pairs_per_user": a.pairs_per_user,
        "data_seed": data_seed,
        "user_tail": a.user_tail,
    }
    name = world if kind != "taste" else f"{world}_{slug(structure)}"
    folder = a.out / "data" / (name if data_seed == 0 else f"{name}_d{data_seed}")
    if kind == "taste":
        kw.update(minority_share=rate, minority_rule=WORLD_MINORITY[world])
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model").exists():
        (folder / "model").symlink_to(a.model)  # one tiny model for every world
    return prepare(folder, a.pairs, a.heldout_pairs, **kw)


def noisy_share(shards: Path, structure: str, seed: int) -> float:
    """The share of training labels against the truth, as the trainer will see them."""
    from pipeline.data.flips import is_flipped, unit_key
    from pipeline.data.shards import label_agrees_with_truth
    from pipeline.evaluate.preference import iter_pairs

    kind, rate = parse_structure(structure)
    bad = []
    for s in iter_pairs(shards):
        agrees = label_agrees_with_truth(s["meta"])
        if kind in ("pair", "user", "prompt") and is_flipped(
            unit_key(s["__key__"], s["meta"], kind), seed, rate
        ):
            agrees = not agrees
        bad.append(not agrees)
    return float(np.mean(bad))


_WEIGHTS_LOCK = threading.Lock()


def annotator_weights_for(shards: Path) -> Path:
    """The data set's annotator_weights.json (tools.annotator_weights at the median cap), made once."""
    out = shards.parent.parent / "annotator_weights.json"
    with _WEIGHTS_LOCK:
        if not out.is_file():
            write_weights(label_counts(str(shards.parent.parent / "data" / "train")), None, out)
    return out


def train_run(
    a, world: str, structure: str, variant: str, data_seed: int, seed: int, shards: Path
) -> tuple[str, int, str]:
    run = a.out / world / "runs" / f"{variant}_{slug(structure)}_{rep_tag(data_seed, seed)}"
    if (run / "export" / "unet").is_dir():
        return run.name, 0, ""
    cfg, overrides = VARIANTS[variant]
    kind, rate = parse_structure(structure)
    cmd = [
        sys.executable,
        "-m",
        "stages.train",
        "--config",
        cfg,
        f"data.shards={shards}",
        f"output.dir={run}",
        f"data.seed={seed}",
        f"train.seed={seed}",
        f"train.max_steps={a.steps}",
        f"data.micro_batch={a.micro_batch}",
        f"optim.lr={a.lr}",
        f"checkpoint.every={a.steps}",
        "output.tensorboard=false",
        *overrides,
    ]
    if kind in ("pair", "user", "prompt"):
        cmd += [f"data.flip_rate={rate}", f"data.flip_by={kind}", f"data.flip_seed={seed}"]
    if variant.endswith("_balanced"):
        cmd.append(f"data.annotator_weights={annotator_weights_for(shards)}")
    if variant == "robust_dpo":  # the oracle
        cmd.append(f"objective.eps={min(a.noisy[(world, structure, data_seed, seed)], 0.49)}")
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    return f"{world}/{run.name}", p.returncode, p.stderr[-3000:]


def final_margins_fn(a, model: Path):
    """run -> the final policy's margins on the run's training pairs (the evaluation report's audit,
    ``minority.audit_draws`` = ``--audit-draws``), cached in the run folder; None with --audit-draws 0."""
    if a.audit_draws <= 0:
        return None
    import pyarrow.parquet as pq
    import torch
    import yaml

    from pipeline.evaluate.minority_report import write_margins
    from pipeline.evaluate.train_margins import FinalMargins
    from pipeline.models import inspect_model, load_unet

    info = inspect_model(model)
    fm = FinalMargins(info, torch.device("cpu"), torch.float32, a.audit_draws, 16, 1234)

    def final(run: Path) -> dict:
        f = run / f"audit_final_d{a.audit_draws}.parquet"
        if not f.is_file():
            rc = yaml.safe_load((run / "config.yaml").read_text())
            write_margins(
                fm.margins(rc, lambda: load_unet(str(run / "export" / "unet"), subfolder=None).eval()), f
            )
        t = pq.read_table(f).to_pydict()
        return {k: np.asarray(v, dtype=object if k == "key" else float) for k, v in t.items()}

    return final


def run_stats(run: Path, structure: str, minority_users: set[int], final_fn=None) -> dict:
    """Detection figures from the run's per-pair records and its last checkpoint's objective state;
    with ``final_fn`` (final_margins_fn) also from the final policy's margins on every training pair."""
    from pipeline.evaluate.minority_report import latest_per_pair, objective_state, posthoc_flip_rates
    from pipeline.metrics_log import read_pair_records
    from pipeline.minority import auroc

    rec = latest_per_pair(read_pair_records(run))
    noisy = rec["true_agrees"] < 0.5
    res: dict = {"noisy_share": float(noisy.mean())}
    has_u = "u" in rec and np.isfinite(rec["u"]).any()
    if noisy.any() and (~noisy).any():
        res["auroc_pairs_neg_h"] = auroc(-rec["h"], noisy)
        if has_u:
            res["auroc_pairs_u"] = auroc(rec["u"], noisy)
    state = objective_state(run)
    if "scalars" in state:
        res["estimated_rate"], res["tau"] = float(state["scalars"][0]), float(state["scalars"][1])
    kind, _ = parse_structure(structure)
    users = rec["user_id"].astype(int)
    if kind == "user":
        minority_users = {u for u in np.unique(users) if rec["flipped"][users == u].all()}
    if kind in ("user", "taste") and minority_users:
        ids = np.unique(users)
        if "user_rate" in state:
            rate = dict(zip(state["users"].tolist(), state["user_rate"].tolist()))
            score = np.array([rate.get(int(u), np.nan) for u in ids])
            res["annotator_score"] = "eps_user"
        else:
            per = rec["u"] if has_u else -rec["h"]
            score = np.array([np.nanmean(per[users == u]) for u in ids])
            res["annotator_score"] = "mean u" if has_u else "mean -h"
        truth = np.array([int(u) in minority_users for u in ids])
        res["auroc_annotators"] = auroc(score, truth)
        few = np.array([(users == u).sum() for u in ids]) <= 10

        def audit(margins: dict, suffix: str) -> bool:
            """The report's audit on ``margins``: shrunk post-hoc rates (all, <= 10 labels), mean -h."""
            fit = posthoc_flip_rates(run, margins)
            if fit is None:
                return False
            mu = margins["user_id"].astype(int)
            shrunk = np.array([fit[1][int(u)] for u in ids])
            res[f"auroc_annotators{suffix}_shrunk"] = auroc(shrunk, truth)
            res[f"auroc_annotators{suffix}_mean_h"] = auroc(
                [-margins["h"][mu == u].mean() for u in ids], truth
            )
            if truth[few].any() and (~truth[few]).any():
                res[f"auroc_annotators{suffix}_shrunk_few"] = auroc(shrunk[few], truth[few])
            return True

        # from the records (each pair's margin when it was trained on), then as the report does it now:
        # the final policy's margins on every training pair
        if audit(rec, "") and final_fn is not None:
            fin = final_fn(run)
            res["auroc_pairs_neg_h_final"] = auroc(-fin["h"], fin["true_agrees"] < 0.5)
            audit(fin, "_final")
    return res


def mean_se(x) -> dict:
    x = np.asarray([v for v in x if v is not None and np.isfinite(v)], dtype=float)
    if not len(x):
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"mean": float(x.mean()), "se": se, "n": int(len(x)), "per_seed": x.tolist()}


def reps(a) -> list[tuple[int, int]]:
    """(data seed, train seed) of every repetition of a cell."""
    return [(d, s) for d in a.data_seeds for s in a.seeds]


def summarise(a, results: dict) -> dict:
    table: dict = {}
    for world in all_worlds(a):
        for st in a.structures:
            for v in a.variants:
                runs = [results.get(f"{world}/{v}_{slug(st)}_{rep_tag(d, s)}") for d, s in reps(a)]
                if any(r is None for r in runs):
                    continue
                row = {
                    k: mean_se([r.get(k) for r in runs])
                    for k in (
                        "accuracy_true",
                        "auroc_pairs_u",
                        "auroc_pairs_neg_h",
                        "auroc_annotators",
                        "auroc_annotators_shrunk",
                        "auroc_annotators_mean_h",
                        "auroc_annotators_shrunk_few",
                        "auroc_pairs_neg_h_final",
                        "auroc_annotators_final_shrunk",
                        "auroc_annotators_final_mean_h",
                        "auroc_annotators_final_shrunk_few",
                        "estimated_rate",
                        "noisy_share",
                    )
                }
                for ref in ("dpo", "robust_dpo"):
                    other = [results.get(f"{world}/{ref}_{slug(st)}_{rep_tag(d, s)}") for d, s in reps(a)]
                    if v != ref and all(o is not None for o in other):
                        row[f"minus_{ref}"] = mean_se(
                            [r["accuracy_true"] - o["accuracy_true"] for r, o in zip(runs, other)]
                        )
                table[f"{world}|{st}|{v}"] = row
    return table


def _cell(m: dict | None, nd: int = 3) -> str:
    if not m or not m.get("n"):
        return "-"
    return f"{m['mean']:.{nd}f}" + (f" ± {m['se']:.{nd}f}" if np.isfinite(m["se"]) else "")


def write_outputs(a, table: dict) -> str:
    lines = []
    for world in all_worlds(a):
        tag = "HELD OUT" if world in a.heldout else "settings chosen here"
        lines += [
            f"\n### {world} ({tag})\n",
            "| structure | variant | acc. vs truth | - dpo | - robust_dpo (oracle) | "
            "AUROC pairs u | AUROC pairs -h | AUROC annotators | AUROC annotators, shrunk rate "
            "(<= 10 labels) | audit by the final policy: AUROC annotators, shrunk rate (<= 10 labels) | "
            "est. rate / true |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for st in a.structures:
            for v in a.variants:
                r = table.get(f"{world}|{st}|{v}")
                if r is None:
                    continue
                est = (
                    f"{_cell(r['estimated_rate'])} / {r['noisy_share']['mean']:.3f}"
                    if r["estimated_rate"]["n"]
                    else "-"
                )
                lines.append(
                    f"| {st} | {v} | {_cell(r['accuracy_true'])} | {_cell(r.get('minus_dpo'))} | "
                    f"{_cell(r.get('minus_robust_dpo'))} | {_cell(r['auroc_pairs_u'])} | "
                    f"{_cell(r['auroc_pairs_neg_h'])} | {_cell(r['auroc_annotators'])} | "
                    f"{_cell(r['auroc_annotators_shrunk'])} ({_cell(r['auroc_annotators_shrunk_few'])}) | "
                    f"{_cell(r['auroc_annotators_final_shrunk'])} ({_cell(r['auroc_annotators_final_shrunk_few'])}) | "
                    f"{est} |"
                )
    md = "\n".join(lines) + "\n"
    (a.out / f"table{a.name}.md").write_text(md)
    _plot(a, table)
    return md


def _plot(a, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = all_worlds(a)
    fig, axes = plt.subplots(1, len(worlds), figsize=(5 * len(worlds) + 2, 4.2), squeeze=False, sharey=True)
    width = 0.8 / len(a.variants)
    colours = plt.get_cmap("tab10").colors
    for ax, world in zip(axes[0], worlds):
        for j, v in enumerate(a.variants):
            xs, ys, es = [], [], []
            for i, st in enumerate(a.structures):
                r = table.get(f"{world}|{st}|{v}")
                if r is not None and r["accuracy_true"]["n"]:
                    xs.append(i + (j - (len(a.variants) - 1) / 2) * width)
                    ys.append(r["accuracy_true"]["mean"])
                    es.append(np.nan_to_num(r["accuracy_true"]["se"]))
            ax.bar(xs, ys, width, yerr=es, capsize=2, color=colours[j % 10], label=v)
        ax.axhline(0.5, color="gray", ls=":", lw=0.8)
        ax.set_xticks(range(len(a.structures)), a.structures, fontsize=8)
        ax.set_ylim(0.4, None)
        ax.set_title(f"{world}" + (" (held out)" if world in a.heldout else ""), fontsize=10)
    axes[0][0].set_ylabel("held-out accuracy vs the truth (mean ± s.e.)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(
        f"tiny model, {a.pairs} pairs ({a.pairs_per_user:g} per annotator), {a.steps} steps x "
        f"{a.micro_batch} pairs, {len(a.data_seeds)} data x {len(a.seeds)} train seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(a.out / f"accuracy{a.name}.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.studies.noise_study", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path("noise_study"))
    p.add_argument("--worlds", nargs="*", default=["brightness", "daynight"], choices=list(WORLD_MINORITY))
    p.add_argument(
        "--heldout",
        nargs="+",
        default=["warmth"],
        choices=[*WORLD_MINORITY, "none"],
        help="the worlds reported apart, on which nothing was chosen (none: only --worlds, e.g. a sweep)",
    )
    p.add_argument(
        "--structures", nargs="+", default=["none", "pair:0.3", "user:0.3", "prompt:0.3", "taste:0.3"]
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["dpo", "robust_dpo", "robust_dpo_fixed", "em_dpo", "adaptive_calibrated"],
        choices=list(VARIANTS),
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train seeds")
    p.add_argument(
        "--data-seeds", dest="data_seeds", type=int, nargs="+", default=[0], help="training sets per world"
    )
    p.add_argument("--pairs", type=int, default=3000)
    p.add_argument("--heldout-pairs", dest="heldout_pairs", type=int, default=500)
    p.add_argument("--pairs-per-user", type=float, default=20.0)
    p.add_argument(
        "--user-tail",
        type=float,
        default=0.0,
        help="log-normal sigma of the annotators' label counts (make_pickapic --user-tail; 0: uniform)",
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument(
        "--audit-draws",
        type=int,
        default=EvalMinority().audit_draws,
        help="draws per training pair of the final-policy audit (user and taste structures; 0: none)",
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--name", default="", help="suffix of the output files, e.g. _sweep (runs are shared)")
    a = p.parse_args(argv)
    if not all_worlds(a):
        raise SystemExit("no world: give --worlds and/or --heldout")
    both = sorted(set(a.heldout) & set(a.worlds))
    if both:
        raise SystemExit(f"--heldout {both[0]} is also in --worlds: a held-out world must be held out")
    for s in a.structures:
        parse_structure(s)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    a.model = a.out / "model"
    if not (a.model / "model_index.json").is_file():
        from tools.toy.make_tiny_model import make_tiny_model

        make_tiny_model("sd15", a.model, seed=0, vae_steps=300)
    data = {}
    for w in all_worlds(a):
        for st in a.structures:
            for d in a.data_seeds:
                data[(w, st, d)] = data_for(a, w, st, d)
    a.noisy = {}
    for (w, st, d), (_, shards, _) in data.items():
        for s in a.seeds:
            a.noisy[(w, st, d, s)] = noisy_share(shards, st, s)
    # seed-major: an interrupted study has every cell at fewer seeds, not some cells at all of them
    jobs = [
        (w, st, v, d, s) for d, s in reps(a) for w in all_worlds(a) for st in a.structures for v in a.variants
    ]
    if not train_all(lambda j: train_run(a, *j, data[(j[0], j[1], j[3])][1]), [jobs], a.jobs):
        return 1
    results = evaluate_all(a, data, jobs)
    table = summarise(a, results)
    md = write_outputs(a, table)
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "noisy"}
    (a.out / f"results{a.name}.json").write_text(
        json.dumps({"args": args, "runs": results, "table": table}, indent=1)
    )
    print(md)
    print(f"wrote {a.out}/table{a.name}.md, results{a.name}.json and accuracy{a.name}.png")
    return 0


def evaluate_all(a, data: dict, jobs: list) -> dict:
    """Held-out accuracy of every export (tools.studies.robustness.evaluate, per world) and each run's stats."""
    from tools.studies.robustness import evaluate
    from tools.toy.make_pickapic import annotators

    results = {}
    for w in all_worlds(a):
        names = [f"{v}_{slug(st)}_{rep_tag(d, s)}" for ww, st, v, d, s in jobs if ww == w]
        # every structure of a world shares its held-out pairs (make_rows' seed 200, judged by the truth)
        model, _, heldout = next(v for (ww, _, _), v in data.items() if ww == w)
        ns = SimpleNamespace(out=a.out / w, curve=False, draws=a.draws, steps=a.steps)
        acc = evaluate(ns, model, heldout, names)  # reads OUT/WORLD/runs/NAME, caches in OUT/WORLD
        final_fn = final_margins_fn(a, model)
        for ww, st, v, d, s in jobs:
            if ww != w:
                continue
            name = f"{v}_{slug(st)}_{rep_tag(d, s)}"
            kind, rate = parse_structure(st)
            minority = set()
            if kind == "taste":
                info = annotators(
                    a.pairs,
                    100 + d,
                    world=w,
                    pairs_per_user=a.pairs_per_user,
                    minority_share=rate,
                    minority_rule=WORLD_MINORITY[w],
                    user_tail=a.user_tail,
                )
                minority = {x["user_id"] for x in info["annotators"] if x["group"] == "minority"}
            res = {
                "accuracy_true": acc[name]["accuracy_true"],
                "world": w,
                "structure": st,
                "variant": v,
                "seed": s,
                "data_seed": d,
            }
            res.update(run_stats(ns.out / "runs" / name, st, minority, final_fn))
            results[f"{w}/{name}"] = res
    return results


if __name__ == "__main__":
    sys.exit(main())
