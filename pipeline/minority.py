"""Does a score find the flipped (minority) pairs? AUROC and the flipped share per score bin
(the Adaptive-DPO paper's Figure 3)."""

from __future__ import annotations

import numpy as np


def _rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (scipy's ``rankdata(method="average")``)."""
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    first = np.empty(n, dtype=bool)  # where a run of equal values starts, in sorted order
    first[:1] = True
    np.not_equal(sx[1:], sx[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], n) - 1  # last sorted position of each run
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ((starts + ends) / 2.0 + 1.0)[np.cumsum(first) - 1]
    return ranks


def auroc(scores, positive) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half
    (the Mann-Whitney U statistic over n_pos * n_neg). NaN scores are dropped; NaN when a class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rank_average(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def flipped_share_by_bin(scores, flipped, bins: int = 10, strategy: str = "quantile") -> list[dict]:
    """Split pairs into ``bins`` score bins (equal counts with ``quantile``, equal widths with
    ``uniform``) and report each bin's range, size and share of flipped pairs."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(flipped, dtype=bool)
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    if len(s) == 0:
        return []
    if strategy == "quantile":
        edges = np.quantile(s, np.linspace(0, 1, bins + 1))
    elif strategy == "uniform":
        edges = np.linspace(s.min(), s.max(), bins + 1)
    else:
        raise ValueError(f"strategy {strategy!r}: expected quantile or uniform")
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        out.append(
            {
                "bin": b,
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": int(m.sum()),
                "flipped_share": float(y[m].mean()) if m.any() else float("nan"),
            }
        )
    return out
