"""Load benchmark of the labelling service on 127.0.0.1: simulated annotators label as fast as the
server answers; then every acknowledged label is checked in the database (none lost, none twice).

    python -m tools.label_load --out label_load.json [--annotators 50] [--labels 3000] [--per-item 3]
        [--db sqlite|postgres] [--workers 1] [--retry-share 0.05] [--max-seconds 600]

Each simulated annotator loops: POST /api/next, GET its two images, POST /api/label (a random
choice), and for ``--retry-share`` of the labels sends the same request again, as a client whose
acknowledgement was lost would (it must come back ``duplicate`` and be stored once). It stops when
the campaign has ``--labels`` labels, when nothing is left for it, or after ``--max-seconds``.
The server is ``python -m stages.label serve`` in its own process (``--workers`` app processes), on
a SQLite file or a throwaway PostgreSQL server (``--db postgres``); the data are toy Pick-a-Pic pairs
(tools.toy.make_pickapic). Writes JSON: labels/s, latency percentiles per request kind, and the checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from tools import label_servers
from tools.toy.make_pickapic import make_rows, write_parquet


@dataclass
class LoadResult:
    acked: dict[str, tuple[str, str, str]] = field(
        default_factory=dict
    )  # submission id -> (annotator, item, choice)
    unacked: dict[str, tuple[str, str, dict]] = field(
        default_factory=dict
    )  # sent, no answer: (annotator, token, body)
    retries: int = 0
    retry_not_duplicate: int = 0
    refused: list[str] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=lambda: {"next": [], "image": [], "label": []})
    wall_s: float = 0.0


async def _annotator(
    name: str,
    token: str,
    base: str,
    res: LoadResult,
    target: int,
    deadline: float,
    retry_share: float,
    rng: random.Random,
    images: bool,
) -> None:
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60.0) as c:

        async def timed(kind: str, method: str, url: str, **kw) -> httpx.Response:
            t = time.perf_counter()
            r = await c.request(method, url, **kw)
            res.latency[kind].append(time.perf_counter() - t)
            return r

        while len(res.acked) < target and time.time() < deadline:
            try:
                r = await timed("next", "POST", "/api/next", json={"n": 1})
            except httpx.HTTPError:
                return  # the server is gone (the kill test): this annotator stops
            if r.status_code != 200:
                res.refused.append(f"next {r.status_code} {r.text[:200]}")
                return
            items = r.json()["items"]
            if not items:
                return  # nothing left for this annotator
            item = items[0]
            if images:
                for im in item["images"]:
                    try:
                        await timed("image", "GET", "/" + im["url"])
                    except httpx.HTTPError:
                        return
            choice = rng.choice(
                [str(item["images"][0]["index"]), str(item["images"][1]["index"]), "tie", "skip"]
            )
            body = {
                "item": item["key"],
                "choice": choice,
                "submission_id": uuid.uuid4().hex,
                "duration_ms": rng.randint(300, 4000),
            }
            sends = 2 if rng.random() < retry_share else 1
            for attempt in range(sends):
                res.unacked[body["submission_id"]] = (name, token, body)
                try:
                    r = await timed("label", "POST", "/api/label", json=body)
                except httpx.HTTPError:
                    return  # sent, never acknowledged: stays in unacked
                if r.status_code != 200:
                    res.refused.append(f"label {r.status_code} {r.text[:200]}")
                    return
                res.unacked.pop(body["submission_id"], None)
                if attempt:
                    res.retries += 1
                    res.retry_not_duplicate += not r.json()["duplicate"]
                res.acked[body["submission_id"]] = (name, item["key"], choice)


def run_load(
    base: str,
    tokens: dict[str, str],
    target: int,
    max_seconds: float = 600.0,
    retry_share: float = 0.05,
    seed: int = 0,
    images: bool = True,
    result: LoadResult | None = None,
) -> LoadResult:
    """Run the simulated annotators against ``base`` until ``target`` labels are acknowledged."""
    res = result or LoadResult()
    rng = random.Random(seed)
    deadline = time.time() + max_seconds

    async def main():
        await asyncio.gather(
            *(
                _annotator(
                    n, t, base, res, target, deadline, retry_share, random.Random(rng.random()), images
                )
                for n, t in tokens.items()
            )
        )

    t0 = time.perf_counter()
    asyncio.run(main())
    res.wall_s = time.perf_counter() - t0
    return res


def check_stored(db_url: str, res: LoadResult) -> dict:
    """Every acknowledged label is in the database exactly once with its choice; no (annotator, item)
    pair twice; no item over its R."""
    from pipeline.label.storage import Database

    db = Database(db_url, create=False)
    per_item = int(db.get_meta("per_item", 3))
    with db.tx() as c:
        rows = c.execute(
            "SELECT l.submission_id, a.name, i.key, l.choice FROM labels l JOIN annotators a ON a.id = l.annotator_id "
            "JOIN items i ON i.id = l.item_id"
        ).fetchall()
        over = c.execute(
            "SELECT COUNT(*) FROM (SELECT item_id FROM labels WHERE choice != 'skip' GROUP BY item_id "
            "HAVING COUNT(*) > ?) x",
            (per_item,),
        ).fetchone()[0]
    db.close()
    stored: dict[str, list] = {}
    for sid, name, key, choice in rows:
        stored.setdefault(sid, []).append((name, key, choice))
    lost = [s for s in res.acked if s not in stored]
    wrong = [s for s, v in res.acked.items() if s in stored and stored[s] != [v]]
    twice = [s for s, v in stored.items() if len(v) > 1]
    pairs = [(n, k) for n, k, _ in (r[1:] for r in rows)]
    return {
        "stored": len(rows),
        "acknowledged": len(res.acked),
        "lost": len(lost),
        "wrong": len(wrong),
        "stored_twice": len(twice),
        "same_item_twice_for_one_annotator": len(pairs) - len(set(pairs)),
        "items_over_R": int(over),
    }


def _pct(xs: list[float]) -> dict:
    if not xs:
        return {}
    a = np.array(xs) * 1000.0
    return {
        "n": len(xs),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
    }


def prepare(
    tmp: Path, items: int, annotators: int, db_url: str, seed: int = 0
) -> tuple[Path, dict[str, str]]:
    """Toy pairs (64-96 px) and the annotators' tokens."""
    from pipeline.label.people import add_person
    from pipeline.label.storage import Database

    src = tmp / "pairs"
    rows = make_rows(
        items, seed=seed, min_size=64, max_size=96, tie_rate=0, unlabelled_rate=0, identical_rate=0
    )
    write_parquet(rows, src, rows_per_file=500)
    db = Database(db_url)
    tokens = {f"sim{i:03d}": add_person(db, f"sim{i:03d}")[1] for i in range(annotators)}
    db.close()
    return src, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.label_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--annotators", type=int, default=50)
    p.add_argument("--labels", type=int, default=3000, help="stop when this many labels are acknowledged")
    p.add_argument("--per-item", type=int, default=3)
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--workers", type=int, default=1, help="app processes")
    p.add_argument("--retry-share", type=float, default=0.05)
    p.add_argument("--no-images", action="store_true", help="do not fetch the images")
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    # skips free a slot, so a few more items than labels / R
    items = math.ceil(a.labels / a.per_item * 1.4) + a.annotators
    with tempfile.TemporaryDirectory(prefix="label-load-") as tmp:
        tmp = Path(tmp)
        pg = label_servers.TempPostgres().start() if a.db == "postgres" else None
        try:
            db_url = pg.create_database("load") if pg else str(tmp / "labels.db")
            src, tokens = prepare(tmp, items, a.annotators, db_url, a.seed)
            overrides = [
                f"source={src}",
                f"db={db_url}",
                f"assignment.per_item={a.per_item}",
                f"server.workers={a.workers}",
                "items.shuffle=false",
            ]
            with label_servers.LabelServer(overrides, log=tmp / "server.log") as srv:
                res = run_load(
                    srv.url, tokens, a.labels, a.max_seconds, a.retry_share, a.seed, not a.no_images
                )
            checks = check_stored(db_url, res)
        finally:
            if pg:
                pg.stop()
    out = {
        "command": "python -m tools.label_load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpus": os.cpu_count(),
        "db": a.db,
        "workers": a.workers,
        "annotators": a.annotators,
        "items": items,
        "per_item": a.per_item,
        "labels_acknowledged": len(res.acked),
        "wall_s": round(res.wall_s, 2),
        "labels_per_s": round(len(res.acked) / res.wall_s, 1),
        "requests_per_s": round(sum(len(v) for v in res.latency.values()) / res.wall_s, 1),
        "latency": {k: _pct(v) for k, v in res.latency.items()},
        "retries": res.retries,
        "retries_not_flagged_duplicate": res.retry_not_duplicate,
        "refused": res.refused[:10],
        "checks": checks,
    }
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    ok = checks["lost"] == checks["stored_twice"] == checks["wrong"] == 0 and not res.refused
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
