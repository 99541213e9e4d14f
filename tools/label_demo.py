"""The whole loop of collecting your own preferences, on the toy world: two annotators label pairs
through the labelling service's HTTP API, one following the true preference and one against it on
purpose; export, encode, train Adaptive-DPO (the calibrated variant: with the paper's settings the
minority score does not see flipped labels here, FINDINGS.md), evaluate; the evaluation's
per-annotator audit (from the trained run's per-pair records) must list the disagreeing annotator
first.

    python -m tools.label_demo [--out label_demo] [--pairs 400] [--against 0.25] [--steps 100] [--model DIR]

Every step but the labelling is one of the project's commands, printed before it runs. The two
annotators are simulated: "alice" picks the truly better image (the toy data record it), "mallory"
takes a share ``--against`` of the items and picks the other one. Exit code 1 when the audit does
not put mallory first.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from tools import label_servers
from tools.toy import make_pickapic, make_tiny_model


def _run(cmd: list[str]) -> str:
    print("\n$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(p.stdout[-3000:], end="", flush=True)
    return p.stdout


def label_as_two(url: str, tokens: dict[str, str], truth: dict[str, int], against: float, seed: int) -> dict:
    """Label every item once, through the API: mallory takes ``against`` of them and picks the worse
    image, alice the rest and picks the better one. Returns how many each labelled."""
    rng = random.Random(seed)
    clients = {
        n: httpx.Client(base_url=url, headers={"authorization": f"Bearer {t}"}, timeout=60)
        for n, t in tokens.items()
    }
    counts = dict.fromkeys(tokens, 0)
    finished: set[str] = set()
    while len(finished) < len(tokens):
        who = "mallory" if rng.random() < against else "alice"
        if who in finished:
            who = next(n for n in tokens if n not in finished)
        r = clients[who].post("/api/next", json={"n": 1})
        r.raise_for_status()
        if not r.json()["items"]:
            finished.add(who)
            continue
        item = r.json()["items"][0]
        better = truth[item["key"]]
        choice = better if who == "alice" else 1 - better
        r = clients[who].post(
            "/api/label",
            json={
                "item": item["key"],
                "choice": str(choice),
                "submission_id": uuid.uuid4().hex,
                "duration_ms": 900,
            },
        )
        r.raise_for_status()
        counts[who] += 1
    for c in clients.values():
        c.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.label_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="label_demo")
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument(
        "--against", type=float, default=0.25, help="share of the items mallory labels (against the truth)"
    )
    p.add_argument("--steps", type=int, default=100)
    # the calibrated variant: with the paper's settings u is blind to flipped labels on the toy worlds
    # (FINDINGS.md), so its audit orders the annotators by chance
    p.add_argument("--train-config", default="configs/train/tiny_adaptive_dpo_calibrated.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a tiny model folder to reuse (default: made under --out)")
    a = p.parse_args(argv)
    out = Path(a.out)
    py = sys.executable
    model = Path(a.model) if a.model else out / "models" / "sd15"
    if not (model / "model_index.json").is_file():
        # a VAE trained briefly as an autoencoder, so latents carry the images (tools/toy/make_tiny_model.py)
        make_tiny_model.main(["--family", "sd15", "--out", str(model), "--seed", "0", "--vae-steps", "300"])
    pairs = out / "pickapic"
    if not pairs.is_dir():
        make_pickapic.main(
            [
                "--out",
                str(pairs),
                "--pairs",
                str(a.pairs),
                "--seed",
                str(a.seed),
                "--tie-rate",
                "0",
                "--unlabelled-rate",
                "0",
                "--identical-rate",
                "0",
            ]
        )

    # 1. a campaign with two annotators, labelled through the HTTP API
    db = out / "labels.db"
    if db.exists():
        raise SystemExit(f"{db} exists: give a new --out (the labelling is not resumable)")
    tokens = {}
    for name in ("alice", "mallory"):
        text = _run([py, "-m", "stages.label", "add-annotator", "--db", str(db), name])
        tokens[name] = text.split("token: ")[1].split()[0]
    from pipeline.label.sources import load_source

    truth = {it.key: 0 if it.meta["true_label_0"] == 1.0 else 1 for it in load_source(str(pairs)).items}
    serve = [f"source={pairs}", f"db={db}", "assignment.per_item=1"]
    print(
        f"\n$ python -m stages.label serve --config configs/label/default.yaml {' '.join(serve)}  (background)"
    )
    with label_servers.LabelServer(serve, log=out / "serve.log") as srv:
        counts = label_as_two(srv.url, tokens, truth, a.against, a.seed)
    print(f"labelled through the API: {counts}")

    # 2. export -> encode -> train -> evaluate, with the project's commands
    _run([py, "-m", "stages.label", "export", "--db", str(db), "--out", str(out / "prefs")])
    _run(
        [
            py,
            "-m",
            "stages.encode",
            "--config",
            "configs/encode/tiny.yaml",
            f"model.path={model}",
            f"data.source={out / 'prefs'}",
            f"output.dir={out / 'shards'}",
        ]
    )
    run = out / "run"
    _run(
        [
            py,
            "-m",
            "stages.train",
            "--config",
            a.train_config,
            f"data.shards={out / 'shards'}",
            f"output.dir={run}",
            f"train.max_steps={a.steps}",
            "data.micro_batch=8",
            f"checkpoint.every={a.steps}",
        ]
    )
    _run(
        [
            py,
            "-m",
            "stages.evaluate",
            "--config",
            "configs/eval/tiny.yaml",
            f"output={out / 'report'}",
            f"minority.runs.adaptive={run}",
        ]
    )

    # 3. the per-annotator audit, with names
    from pipeline.label.people import list_people
    from pipeline.label.storage import Database

    names = {r["user_id"]: r["name"] for r in list_people(Database(str(db), create=False))}
    audit = json.loads((out / "report" / "report.json").read_text())["minority"]["adaptive"]["annotators"]
    print("\nper-annotator audit of the trained run (furthest from the consensus first):")
    print(
        f"{'annotator':<10} {'user_id':>7} {'pairs':>6} {'high-score share':>17} {'mean score':>11} {'policy disagrees':>17}"
    )
    for r in audit:
        print(
            f"{names.get(r['user_id'], '?'):<10} {r['user_id']:>7} {r['pairs']:>6} {r['high_share']:>17.3f} "
            f"{r['mean_score']:>11.4g} {r['policy_disagrees']:>17.3f}"
        )
    first = names.get(audit[0]["user_id"]) if audit else None
    print(
        f"\nfirst in the audit: {first} ({'as expected' if first == 'mallory' else 'NOT the disagreeing annotator'})"
    )
    return 0 if first == "mallory" else 1


if __name__ == "__main__":
    sys.exit(main())
