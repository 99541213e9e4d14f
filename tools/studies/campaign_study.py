"""A simulated labelling campaign through the service's HTTP API, then training on what it measured.

    python -m tools.studies.campaign_study --out campaign_study [--world brightness] [--flipped-share 0.4]
        [--per-item 2] [--checks 30] [--annotators 100] [--data-seeds 0 1] [--train-seeds 0 1]

For each data seed: toy pairs (tools.toy.make_pickapic) are served by ``stages.label serve`` with
``assignment.per_item`` R and ``checks.count`` check items whose answer is the truth; simulated
annotators label them over HTTP (as people would: ``/api/next``, ``/api/label``). Their label counts
are heavy-tailed, like Pick-a-Pic's (weights drawn log-normal with sigma ``--spread``: most annotators
give a handful of labels, a few give hundreds); a share of the annotators, chosen so that their labels
are ``--flipped-share`` of all labels, label against the truth (another taste, or the rule reversed),
and everyone slips with probability ``--slip``. ``stages.label export`` writes the parquet and
``flip_rates.json``; its estimates are compared with each annotator's true rate (``slip`` or
``1 - slip``): mean |error|, share within 0.05, AUROC of the estimate for the flipped annotators.
Then the tiny model is trained on the export (``stages.encode``) with

- ``dpo``;
- ``robust_guess``: Robust-DPO at the fixed guess eps 0.3 (configs/train/tiny_robust_dpo_guess.yaml);
- ``robust_oracle``: Robust-DPO told the true share of flipped labels (slips included);
- ``robust_flip_rates``: Robust-DPO at each pair's annotator's measured rate (``objective.flip_rates``);

and every export is scored against the truth on held-out pairs no run trained on (the same held-out
draws for every model). Results: ``results.json``, ``table.md`` (mean ± s.e. over data x train seeds).
Finished campaigns, encodes, runs and evaluations are skipped: the study resumes after a kill.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pyarrow.parquet as pq

from tools import label_servers
from tools.studies.noise_study import mean_se
from tools.studies.robustness import ROOT, _env, evaluate, train_all

VARIANTS = {
    "dpo": ("configs/train/tiny_dpo.yaml", ["objective.name=dpo"]),
    "robust_guess": ("configs/train/tiny_robust_dpo_guess.yaml", []),
    "robust_oracle": ("configs/train/tiny_dpo.yaml", ["objective.name=robust_dpo"]),  # + eps
    "robust_flip_rates": ("configs/train/tiny_dpo.yaml", ["objective.name=robust_dpo"]),  # + flip_rates
}


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("\n$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        raise SystemExit(f"`{' '.join(cmd[:4])} ...` failed (exit {p.returncode}): see {log}")


def encode(model: Path, source: Path, out: Path, log: Path) -> None:
    """``stages.encode`` of a Pick-a-Pic folder with the tiny encode config."""
    cmd = ["--config", "configs/encode/tiny.yaml", f"model.path={model}", f"data.source={source}"]
    _run([sys.executable, "-m", "stages.encode", *cmd, f"output.dir={out}", "output.shard_size=500"], log)


def plan_annotators(a, seed: int) -> list[dict]:
    """Annotators with log-normal weights; flipped ones drawn in random order until their weight share
    reaches --flipped-share (the realised label share is measured after labelling)."""
    rng = np.random.default_rng(seed + 7919)
    w = rng.lognormal(0.0, a.spread, a.annotators)
    w /= w.sum()
    flipped, share = set(), 0.0
    for i in rng.permutation(a.annotators):
        if share + w[i] / 2 > a.flipped_share:
            continue
        flipped.add(int(i))
        share += w[i]
    return [
        {"name": f"a{i:03d}", "weight": float(w[i]), "flipped": i in flipped} for i in range(a.annotators)
    ]


def label_campaign(url: str, people: list[dict], truth: dict[str, int], slip: float, seed: int) -> None:
    """Label until every annotator's queue is empty: each turn an annotator drawn by weight asks for
    the next item and labels it (the truth, reversed when flipped, and reversed again on a slip)."""
    rng = random.Random(seed)
    clients = {
        p["name"]: httpx.Client(base_url=url, headers={"authorization": f"Bearer {p['token']}"}, timeout=60)
        for p in people
    }
    active = list(people)
    try:
        while active:
            p = rng.choices(active, weights=[q["weight"] for q in active])[0]
            r = clients[p["name"]].post("/api/next", json={"n": 1})
            r.raise_for_status()
            items = r.json()["items"]
            if not items:
                active.remove(p)
                continue
            key = items[0]["key"]
            choice = truth[key] ^ int(p["flipped"]) ^ int(rng.random() < slip)
            r = clients[p["name"]].post(
                "/api/label",
                json={
                    "item": key,
                    "choice": str(choice),
                    "submission_id": uuid.uuid4().hex,
                    "duration_ms": 900,
                },
            )
            r.raise_for_status()
    finally:
        for c in clients.values():
            c.close()


def campaign(a, seed: int, model: Path) -> dict:
    """One data seed: toy pairs -> served -> labelled over HTTP -> exported -> encoded. Returns facts."""
    from pipeline.label.people import add_person
    from pipeline.label.sources import load_source
    from pipeline.label.storage import Database
    from pipeline.minority import auroc
    from tools.toy.make_pickapic import make_rows, write_parquet

    d = a.out / f"data{seed}"
    facts_file = d / "campaign.json"
    if facts_file.is_file():
        return json.loads(facts_file.read_text())
    if d.exists():
        shutil.rmtree(d)  # an unfinished campaign: labelling is not resumable, start it again
    d.mkdir(parents=True)
    log = d / "log.txt"
    src = d / "pairs"
    kw = dict(tie_rate=0, unlabelled_rate=0, identical_rate=0, world=a.world)
    write_parquet(make_rows(a.pairs, seed=100 + seed, **kw), src, rows_per_file=1000)
    truth = {it.key: 0 if it.meta["true_label_0"] == 1.0 else 1 for it in load_source(str(src)).items}
    db_path = d / "labels.db"
    db = Database(str(db_path))
    people = plan_annotators(a, seed)
    for p in people:
        person, token = add_person(db, p["name"])
        p["user_id"], p["token"] = person.id, token
    db.close()
    serve = [
        f"source={src}",
        f"db={db_path}",
        f"assignment.per_item={a.per_item}",
        f"checks.count={a.checks}",
        "checks.column=true_label_0",
        "checks.every=10",
        f"items.seed={seed}",
    ]
    with label_servers.LabelServer(serve, log=d / "serve.log") as srv:
        label_campaign(srv.url, people, truth, a.slip, seed)
    _run(
        [sys.executable, "-m", "stages.label", "export", "--db", str(db_path), "--out", str(d / "export")],
        log,
    )
    est = json.loads((d / "export" / "flip_rates.json").read_text())
    rates = {r["user_id"]: r for r in est["annotators"]}
    rows = []
    for p in people:
        r = rates.get(p["user_id"])
        if r is None:  # drew no item
            continue
        true = 1 - a.slip if p["flipped"] else a.slip
        rows.append((p["flipped"], true, r["flip_rate"], r["labels"]))
    fl = np.array([x[0] for x in rows])
    err = np.abs(np.array([x[2] - x[1] for x in rows]))
    n_lab = np.array([x[3] for x in rows], dtype=float)
    table = pq.ParquetDataset(sorted((d / "export").glob("labels-*.parquet"))).read().to_pydict()
    decided = [i for i, c in enumerate(table["choice"]) if c in ("0", "1")]
    wrong = [table["label_0"][i] != table["true_label_0"][i] for i in decided]
    encode(model, d / "export", d / "shards", log)
    facts = {
        "labels": len(decided),
        "annotators_labelling": len(rows),
        "labels_per_annotator": {
            "median": float(np.median(n_lab)),
            "max": int(n_lab.max()),
            "share_with_10_or_fewer": float((n_lab <= 10).mean()),
        },
        "flipped_annotators": int(fl.sum()),
        "wrong_label_share": float(np.mean(wrong)),  # flipped annotators' labels and everyone's slips
        "rate_abs_error_mean": float(err.mean()),
        "rate_abs_error_label_weighted": float((err * n_lab).sum() / n_lab.sum()),
        "rate_within_0.05_share": float((err <= 0.05).mean()),
        "rate_within_0.05_label_share": float(n_lab[err <= 0.05].sum() / n_lab.sum()),
        "auroc_flipped_annotators": auroc([x[2] for x in rows], fl) if fl.any() and (~fl).any() else None,
        "global_flip_rate": est["global_flip_rate"],
    }
    facts_file.write_text(json.dumps(facts, indent=1))
    return facts


def heldout_shards(a, model: Path) -> Path:
    from tools.toy.make_pickapic import make_rows, write_parquet

    src, dst = a.out / "heldout" / "pairs", a.out / "heldout" / "shards"
    if not (dst / "manifest.json").is_file():
        if not src.is_dir():
            rows = make_rows(
                a.heldout, seed=200, tie_rate=0, unlabelled_rate=0, identical_rate=0, world=a.world
            )
            write_parquet(rows, src, rows_per_file=1000)
        encode(model, src, dst, a.out / "heldout.log")
    return dst


def train_one(a, facts: dict, job: tuple[str, int, int]) -> tuple[str, int, str]:
    variant, data_seed, seed = job
    name = f"{variant}_d{data_seed}_s{seed}"
    run = a.out / "runs" / name
    if (run / "export" / "unet").is_dir():
        return name, 0, ""
    cfg, over = VARIANTS[variant]
    d = a.out / f"data{data_seed}"
    extra = {
        "robust_oracle": [f"objective.eps={facts[data_seed]['wrong_label_share']:.4f}"],
        "robust_flip_rates": [f"objective.flip_rates={d / 'export' / 'flip_rates.json'}"],
    }.get(variant, [])
    cmd = [
        sys.executable,
        "-m",
        "stages.train",
        "--config",
        cfg,
        f"data.shards={d / 'shards'}",
        f"output.dir={run}",
        f"data.seed={seed}",
        f"train.seed={seed}",
        f"train.max_steps={a.steps}",
        f"data.micro_batch={a.micro_batch}",
        f"checkpoint.every={a.steps}",
        "output.tensorboard=false",
        "data.num_workers=0",
        *over,
        *extra,
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    return name, p.returncode, p.stderr[-3000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.studies.campaign_study", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path("campaign_study"))
    p.add_argument("--world", default="brightness")
    p.add_argument("--pairs", type=int, default=1500, help="items served (each labelled --per-item times)")
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--annotators", type=int, default=100)
    p.add_argument("--spread", type=float, default=1.5, help="sigma of the log-normal label weights")
    p.add_argument("--flipped-share", type=float, default=0.4, help="share of labels from flipped annotators")
    p.add_argument("--slip", type=float, default=0.05, help="every annotator's chance of a slip per label")
    p.add_argument("--per-item", type=int, default=2)
    p.add_argument("--checks", type=int, default=30)
    p.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--model", type=Path, default=None, help="a tiny model folder (default: built, seed 0)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    model = a.model
    if model is None:
        from tools.toy.make_tiny_model import make_tiny_model

        model = a.out / "model"
        if not (model / "model_index.json").is_file():
            make_tiny_model("sd15", model, seed=0, vae_steps=300)
    facts = {s: campaign(a, s, model) for s in a.data_seeds}
    heldout = heldout_shards(a, model)
    jobs = [(v, ds, s) for v in a.variants for ds in a.data_seeds for s in a.train_seeds]
    if not train_all(lambda j: train_one(a, facts, j), [jobs], a.jobs):
        return 1
    names = [f"{v}_d{ds}_s{s}" for v, ds, s in jobs]
    res = evaluate(
        SimpleNamespace(out=a.out, curve=False, draws=a.draws, steps=a.steps), model, heldout, names
    )
    table = {
        v: mean_se([res[f"{v}_d{ds}_s{s}"]["accuracy_true"] for _, ds, s in jobs if _ == v])
        for v in a.variants
    }
    est = {
        k: mean_se([facts[s][k] for s in a.data_seeds])
        for k in (
            "wrong_label_share",
            "rate_abs_error_mean",
            "rate_abs_error_label_weighted",
            "rate_within_0.05_share",
            "rate_within_0.05_label_share",
            "auroc_flipped_annotators",
        )
    }
    out = {
        "args": {k: str(v) for k, v in vars(a).items()},
        "campaigns": facts,
        "estimates": est,
        "accuracy_true": table,
    }
    (a.out / "results.json").write_text(json.dumps(out, indent=1))
    n = len(a.data_seeds) * len(a.train_seeds)
    lines = [
        f"Campaign on `{a.world}`: {a.annotators} annotators, R = {a.per_item}, {a.checks} check items, "
        f"flipped annotators' labels {est['wrong_label_share']['mean']:.3f} of all (slips {a.slip} included); "
        f"{len(a.data_seeds)} data seeds x {len(a.train_seeds)} train seeds (n = {n}), mean ± s.e.",
        "",
        "| estimate of each annotator's rate | mean ± s.e. over data seeds |",
        "|---|---|",
    ]
    for k, m in est.items():
        if k != "wrong_label_share":
            lines.append(f"| {k} | {m['mean']:.3f} ± {m['se']:.3f} |")
    lines += ["", "| variant | held-out accuracy vs truth |", "|---|---|"]
    for v, m in table.items():
        lines.append(f"| {v} | {m['mean']:.3f} ± {m['se']:.3f} |")
    md = "\n".join(lines) + "\n"
    (a.out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
