"""Who labels against the majority, and how often: per-annotator flip rates from the labels alone.

Dawid & Skene's EM (1979) in its one-coin form, for the labelling service's items (a pair, or a group
of K images of which the best is chosen): item i has an unknown true choice y_i (uniform prior over
its K_i options); annotator a reports it with probability 1 - e_a and each other option with
probability e_a / (K_i - 1). For a pair, e_a is the annotator's flip rate: a careless annotator has
e_a near 0.5, a wholly flipped one (another taste, or labelling against the rule) near 1.

- E-step: the posterior of each item's true choice given every judgement of it;
  ``log q_i(c) = sum over labels l of i: log(1 - e_a(l)) if c == choice(l) else log(e_a(l) / (K_i - 1))``.
- M-step: e_a = (expected disagreements of a's labels with the truth + kappa * e) / (a's labels + kappa),
  where e is the pooled rate over every annotator: a Beta prior of strength ``kappa`` labels centred
  on the global rate, so an annotator with 3 labels is not called perfect or wholly flipped on that
  alone (shrinkage toward the global estimate), while one with 300 is read from their own labels.
- Check items (``is_check``, with a known ``answer``) anchor the truth: their posterior is the answer.
  Items judged once (no check) say nothing about anyone's rate and are left out of the M-step.
- Identifiability: redundancy (two or more judgements per item) or check items make the rates
  estimable; binary comparisons with one label each do not (Dawid-Skene and the EM-DPO paper both
  say so). EM starts from the majority vote, so "the majority is right more often than not" picks
  the solution among the two mirror images of a pair model.

Ties and skips are not judgements of the best image and are ignored here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

RATE_FLOOR = 1e-3  # rates are kept in [floor, 1 - floor]: a log of 0 would freeze the EM


@dataclass
class AnnotatorRate:
    user_id: int
    name: str | None
    labels: int  # judgements used (ties and skips excluded)
    informative: int  # of which on items judged by someone else too, or check items
    flip_rate: float  # the shrunk estimate: what training should use
    raw_flip_rate: float | None  # from this annotator's informative labels alone (None without any)
    check_items: int = 0
    check_accuracy: float | None = None

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class Reliability:
    global_rate: float
    annotators: dict[int, AnnotatorRate]
    posterior: dict[int, np.ndarray] = field(repr=False)  # item_id -> P(true choice = option c)
    iterations: int = 0
    kappa: float = 0.0

    def rate(self, user_id: int) -> float:
        a = self.annotators.get(int(user_id))
        return self.global_rate if a is None else a.flip_rate

    def as_dict(self) -> dict:
        return {
            "model": "Dawid-Skene one-coin EM, Beta shrinkage toward the global rate",
            "global_flip_rate": self.global_rate,
            "kappa": self.kappa,
            "iterations": self.iterations,
            "annotators": [a.as_dict() for a in sorted(self.annotators.values(), key=lambda a: -a.flip_rate)],
        }


def _options(rec: dict) -> int:
    return 2 if rec.get("kind", "pair") == "pair" else len(rec["images"])


def estimate(labels: list[dict], kappa: float = 4.0, iters: int = 200, tol: float = 1e-7) -> Reliability:
    """Flip rates from label records (``pipeline.label.storage.label_records``: item_id, choice, user_id,
    annotator, kind, images, is_check, answer). ``kappa``: the prior's strength in labels."""
    judged = [r for r in labels if r["choice"] not in ("tie", "skip")]
    by_item: dict[int, list[dict]] = defaultdict(list)
    for r in judged:
        by_item[r["item_id"]].append(r)
    k_of = {i: _options(rs[0]) for i, rs in by_item.items()}
    anchor: dict[int, int] = {}
    for i, rs in by_item.items():
        ans = rs[0].get("answer")
        if rs[0].get("is_check") and ans not in (None, "", "tie", "skip"):
            anchor[i] = int(ans)
    informative = {i for i, rs in by_item.items() if len({r["user_id"] for r in rs}) >= 2 or i in anchor}
    users = sorted({int(r["user_id"]) for r in judged})
    names = {int(r["user_id"]): r.get("annotator") for r in judged}

    # start: the majority vote (anchors where known)
    post: dict[int, np.ndarray] = {}
    for i, rs in by_item.items():
        q = np.zeros(k_of[i])
        if i in anchor:
            q[anchor[i]] = 1.0
        else:
            for r in rs:
                q[int(r["choice"])] += 1.0
            q = (q == q.max()).astype(float)
        post[i] = q / q.sum()

    rates = dict.fromkeys(users, 0.5)
    glob = 0.5
    iterations = 0
    for iterations in range(1, iters + 1):  # noqa: B007 (reported)
        # M-step: expected disagreements on informative items
        dis, n = defaultdict(float), defaultdict(float)
        for i in informative:
            for r in by_item[i]:
                u = int(r["user_id"])
                dis[u] += 1.0 - post[i][int(r["choice"])]
                n[u] += 1.0
        total_n = sum(n.values())
        new_glob = sum(dis.values()) / total_n if total_n else glob
        new_glob = min(max(new_glob, RATE_FLOOR), 1 - RATE_FLOOR)
        new_rates = {
            u: min(max((dis[u] + kappa * new_glob) / (n[u] + kappa), RATE_FLOOR), 1 - RATE_FLOOR)
            if (n[u] + kappa) > 0
            else new_glob
            for u in users
        }
        # E-step
        for i, rs in by_item.items():
            if i in anchor:
                continue
            k = k_of[i]
            logq = np.zeros(k)
            for r in rs:
                e = new_rates[int(r["user_id"])]
                c = int(r["choice"])
                other = math.log(e / (k - 1))
                logq += other
                logq[c] += math.log(1 - e) - other
            q = np.exp(logq - logq.max())
            post[i] = q / q.sum()
        change = max([abs(new_rates[u] - rates[u]) for u in users] + [abs(new_glob - glob)])
        rates, glob = new_rates, new_glob
        if change < tol:
            break

    out = {}
    for u in users:
        mine = [r for r in judged if int(r["user_id"]) == u]
        inf = [r for r in mine if r["item_id"] in informative]
        raw = None
        if inf:
            raw = float(np.mean([1.0 - post[r["item_id"]][int(r["choice"])] for r in inf]))
        checks = [r for r in mine if r["item_id"] in anchor]
        out[u] = AnnotatorRate(
            user_id=u,
            name=names.get(u),
            labels=len(mine),
            informative=len(inf),
            flip_rate=float(rates[u]),
            raw_flip_rate=raw,
            check_items=len(checks),
            check_accuracy=float(np.mean([int(r["choice"]) == anchor[r["item_id"]] for r in checks]))
            if checks
            else None,
        )
    return Reliability(
        global_rate=float(glob), annotators=out, posterior=post, iterations=iterations, kappa=kappa
    )
