"""Per-annotator loss weights: each annotator's labels count as if they had at most ``cap`` of them.

Pick-a-Pic's labels per annotator are heavy-tailed: a few annotators give hundreds or thousands of
labels, most give a handful. Trained with one weight per label, the policy sides with whoever gave
the most labels; when the busiest annotators happen to hold a minority view (a flipped rule, another
taste), a third of the annotators can hold half of the labels and the policy learns their view, and an
audit that judges annotators by the policy's margins then ranks the wrong side first (FINDINGS, "A
handful of labels each"). Capping each annotator's total weight at ``cap`` labels makes the policy
side with the majority of *annotators* among those with at least ``cap`` labels, at the price of a
smaller effective sample.

    w_u = min(1, cap / n_u),  then scaled so that the mean weight over the training pairs is 1

(``n_u``: the annotator's usable rows in the parquet, as ``stages.encode`` keeps them), so the average
step, and with it the learning rate's meaning, is unchanged. ``cap`` defaults to the median
annotator's count. The trainer reads the file with ``data.annotator_weights``; annotators missing from
it (rows added later) get weight 1. Written by ``python -m tools.annotator_weights``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.data.pickapic import check_columns, list_sources, scan
from pipeline.errors import UserError

FORMAT = "annotator_weights/1"


def label_counts(source: str) -> Counter:
    """Usable rows per user_id in a Pick-a-Pic parquet file, directory or glob (the rows the encode
    stage keeps: labelled, decisive, different images, no null id or caption)."""
    files = list_sources(source)
    check_columns(files)
    res = scan(files)
    ids = [
        pq.read_table(f, columns=["user_id"])["user_id"].to_pylist() for f in files
    ]  # exact int64, nulls kept as None
    return Counter(int(ids[fi][r]) for fi, r in res.kept)


def compute_weights(counts: Counter, cap: float | None = None) -> tuple[dict[int, float], float]:
    """({user_id: weight}, cap used): min(1, cap / n_u) scaled to mean 1 over the pairs."""
    if not counts:
        raise UserError("no usable labelled rows: nothing to weigh")
    n = np.array(list(counts.values()), dtype=np.float64)
    cap = float(np.median(n)) if cap is None else float(cap)
    if not (math.isfinite(cap) and cap > 0):
        raise UserError(f"--cap {cap}: expected a positive number of labels")
    raw = np.minimum(1.0, cap / n)
    scale = n.sum() / float((n * raw).sum())  # mean over pairs = 1
    return {u: float(r * scale) for u, r in zip(counts, raw)}, cap


def write_weights(counts: Counter, cap: float | None, out: str | Path) -> dict:
    weights, cap = compute_weights(counts, cap)
    n = np.array(list(counts.values()))
    doc = {
        "format": FORMAT,
        "cap": cap,
        "pairs": int(n.sum()),
        "annotators": [
            {"user_id": u, "labels": int(counts[u]), "weight": weights[u]} for u in sorted(weights)
        ],
        # Kish's effective sample size of the weighted pairs, (sum w)^2 / sum w^2 (unweighted: "pairs")
        "effective_pairs": float(
            sum(counts[u] * weights[u] for u in weights) ** 2
            / sum(counts[u] * weights[u] ** 2 for u in weights)
        ),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)
    return doc


class AnnotatorTable:
    """user_id -> one float per annotator, looked up per pair on the device without a host sync;
    annotators absent from the table get ``default``."""

    def __init__(self, user_ids: list[int], values: list[float], default: float):
        order = sorted(range(len(user_ids)), key=lambda i: user_ids[i])
        self.ids = torch.tensor([user_ids[i] for i in order], dtype=torch.int64)
        self.values = torch.tensor([values[i] for i in order], dtype=torch.float32)
        self.default = float(default)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, user_ids: torch.Tensor) -> torch.Tensor:
        """[B] int64 user ids (on the compute device) -> [B] float32 values, on that device."""
        dev = user_ids.device
        if dev not in self._on:
            self._on[dev] = (self.ids.to(dev), self.values.to(dev))
        ids, values = self._on[dev]
        if len(ids) == 0:
            return torch.full(user_ids.shape, self.default, dtype=torch.float32, device=dev)
        idx = torch.searchsorted(ids, user_ids).clamp_(max=len(ids) - 1)
        return torch.where(ids[idx] == user_ids, values[idx], self.default)

    @staticmethod
    def read(path: str | Path, key: str, what: str, writer: str, parse):
        """``parse(json document)`` -> (user ids, ...) of a per-annotator file, with one clear line for a
        missing file, an unreadable or malformed one (naming ``key`` and the file) and a repeated user_id."""
        p = Path(path)
        try:
            out = parse(json.loads(p.read_text()))
        except FileNotFoundError as e:
            raise UserError(f"{key}={p}: no such file ({writer} writes it)") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{key}={p}: not {what} of {writer} ({type(e).__name__}: {e})") from e
        if len(set(out[0])) != len(out[0]):
            raise UserError(f"{key}={p}: a user_id appears twice")
        return out


class AnnotatorWeights(AnnotatorTable):
    @classmethod
    def from_file(cls, path: str | Path, key: str = "data.annotator_weights") -> AnnotatorWeights:
        def parse(d: dict) -> tuple[list[int], list[float]]:
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
            return [int(a["user_id"]) for a in d["annotators"]], [float(a["weight"]) for a in d["annotators"]]

        ids, weights = cls.read(
            path, key, "an annotator_weights.json", "python -m tools.annotator_weights", parse
        )
        bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
        if bad:
            raise UserError(f"{key}={path}: weights must be finite and >= 0, found {bad[0]}")
        return cls(ids, weights, 1.0)
