"""How the labelling goes and whom to trust: progress, time per label, each annotator's agreement
with the majority, accuracy on check items, Krippendorff's alpha, the annotators furthest from the
consensus first.

A label's disagreement with the majority is leave-one-out: among the *other* annotators' judgements
of the same item (an image or "tie"; skips are no judgement), the most frequent ones form the
majority; the label scores 0 when it is one of them (1/m of a point off when m choices share the
top), 1 otherwise. Labels of items nobody else judged are not scored. Annotators are ranked by the
same function that ranks them from a trained run's per-pair records in the evaluation stage
(``pipeline.evaluate.minority_report.rank_annotators``), here with that disagreement as the score.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import krippendorff
import numpy as np

from pipeline.evaluate.minority_report import rank_annotators
from pipeline.label.storage import Database, label_records

TIE = "tie"


def disagreement(labels: list[dict]) -> list[float | None]:
    """Per label: leave-one-out disagreement with the other annotators' majority (None: no others)."""
    by_item: dict[int, Counter] = defaultdict(Counter)
    for r in labels:
        if r["choice"] != "skip":
            by_item[r["item_id"]][r["choice"]] += 1
    out = []
    for r in labels:
        if r["choice"] == "skip":
            out.append(None)
            continue
        others = by_item[r["item_id"]].copy()
        others[r["choice"]] -= 1
        others = +others  # drop zero counts
        if not others:
            out.append(None)
            continue
        top = max(others.values())
        majority = [c for c, n in others.items() if n == top]
        out.append(1.0 - (r["choice"] in majority) / len(majority))
    return out


def alpha(labels: list[dict]) -> float | None:
    """Krippendorff's alpha (nominal: each image and "tie" a category; skips missing) over every item
    judged at least twice; None when it is undefined (fewer than two such judgements or one category)."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for r in labels:
        if r["choice"] != "skip":
            counts[r["item_id"]][r["choice"]] += 1
    units = [c for c in counts.values() if sum(c.values()) >= 2]
    cats = sorted({k for c in units for k in c})
    if not units or len(cats) < 2:
        return None
    vc = np.array([[c.get(k, 0) for k in cats] for c in units], dtype=float)
    return float(krippendorff.alpha(value_counts=vc, level_of_measurement="nominal"))


def summary(db: Database, per_item: int, min_labels: int = 5, high_q: float = 0.9) -> dict:
    """Everything the admin page shows."""
    labels = label_records(db)
    with db.tx() as c:
        items, checks, complete, started = c.execute(
            "SELECT COALESCE(SUM(1 - is_check), 0), COALESCE(SUM(is_check), 0), "
            "COALESCE(SUM(CASE WHEN is_check = 0 AND n_labels >= ? THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN is_check = 0 AND n_labels > 0 THEN 1 ELSE 0 END), 0) FROM items",
            (per_item,),
        ).fetchone()
        people = c.execute(
            "SELECT name, user_id FROM annotators WHERE role = 'annotator' ORDER BY id"
        ).fetchall()
    choices = Counter(r["choice"] if r["choice"] in ("tie", "skip") else "image" for r in labels)
    dis = disagreement(labels)
    by_user: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(labels):
        by_user[int(r["user_id"])].append(i)

    stats = {}
    for name, uid in people:
        idx = by_user.get(int(uid), [])
        mine = [labels[i] for i in idx]
        judged = [r for r in mine if r["choice"] != "skip"]
        secs = np.array([r["duration_ms"] / 1000.0 for r in mine], dtype=float)
        pair_pos = [r["display_pos"] for r in judged if r["kind"] == "pair" and r["display_pos"] is not None]
        scored = [dis[i] for i in idx if dis[i] is not None]
        checks_done = [r for r in judged if r["is_check"] and r["answer"] is not None]
        stats[int(uid)] = {
            "annotator": name,
            "user_id": int(uid),
            "labels": len(judged),
            "ties": sum(r["choice"] == "tie" for r in judged),
            "skips": len(mine) - len(judged),
            "median_s": float(np.median(secs)) if len(secs) else None,
            "mean_s": float(secs.mean()) if len(secs) else None,
            "left_share": float(np.mean(np.array(pair_pos) == 0)) if pair_pos else None,
            "compared": len(scored),
            "agreement": 1.0 - float(np.mean(scored)) if scored else None,
            "checks": len(checks_done),
            "check_accuracy": float(np.mean([r["choice"] == str(r["answer"]) for r in checks_done]))
            if checks_done
            else None,
            "last_label_at": max((r["answered_at"] for r in mine), default=None),
        }
    scored_idx = [i for i, d in enumerate(dis) if d is not None]
    order: list[int] = []
    if scored_idx:
        users = np.array([int(labels[i]["user_id"]) for i in scored_idx])
        score = np.array([dis[i] for i in scored_idx], dtype=float)
        for row in rank_annotators(users, score, high_q, min_labels):
            order.append(row["user_id"])
            stats[row["user_id"]].update(
                {
                    "disagreement": row["mean_score"],
                    "high_share": row["high_share"],
                    "few_labels": row["pairs"] < min_labels,
                }
            )
    order += [u for u in stats if u not in order]  # nobody to compare with yet: at the end
    secs = np.array([r["duration_ms"] / 1000.0 for r in labels], dtype=float)
    return {
        "per_item": per_item,
        "items": int(items),
        "check_items": int(checks),
        "complete": int(complete),
        "started": int(started),
        "labels": len(labels),
        "choices": dict(choices),
        "median_s": float(np.median(secs)) if len(secs) else None,
        "alpha": alpha(labels),
        "annotators": [stats[u] for u in order],
    }
