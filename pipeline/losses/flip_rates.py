"""Per-annotator flip rates measured from redundant labels, looked up per pair on the device.

The labelling service's export writes ``flip_rates.json`` beside the Pick-a-Pic parquet
(``pipeline.label.reliability``: Dawid-Skene EM over items judged by two or more people and check items,
shrunk toward the global rate for annotators with few labels). With ``objective.flip_rates`` pointing
at it, Robust-DPO uses each pair's own rate instead of one assumed rate: a pair labelled by an
annotator who agrees with the consensus gets eps near 0 (plain DPO), one from an annotator who labels
against it nearly always (another taste, or the rule reversed) gets eps near 1.

Robust-DPO's loss is symmetric in (label, eps) -> (reversed label, 1 - eps): a rate e > 1/2 is the same
loss as the reversed label at 1 - e. The rate is folded that way and capped at ``cap`` (the estimator's
variance grows as 1 / (1 - 2 eps)^2: an annotator at chance contributes little either way). Annotators
absent from the file (e.g. public Pick-a-Pic rows mixed in) get the file's global rate.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.data.annotator_weights import AnnotatorTable
from pipeline.errors import UserError


class FlipRateTable(AnnotatorTable):
    """user_id -> flip rate (``lookup``: [B] rates on the device); absent annotators: the global rate."""

    @property
    def global_rate(self) -> float:
        return self.default

    @classmethod
    def from_file(cls, path: str | Path, key: str = "objective.flip_rates") -> FlipRateTable:
        def parse(d: dict) -> tuple[list[int], list[float], float, bool]:
            ann = d["annotators"]
            ids, rates = [int(a["user_id"]) for a in ann], [float(a["flip_rate"]) for a in ann]
            return ids, rates, float(d["global_flip_rate"]), any(int(a.get("informative", 0)) for a in ann)

        ids, rates, glob, informative = cls.read(path, key, "a flip_rates.json", "stages.label export", parse)
        if not informative:
            raise UserError(
                f"{key}={path}: measures nothing (no item was judged by two annotators and no check item "
                "was answered): every rate is the prior. Label with assignment.per_item >= 2 or checks.count > 0"
            )
        bad = [r for r in rates + [glob] if not (math.isfinite(r) and 0.0 <= r <= 1.0)]
        if bad:
            raise UserError(f"{key}={path}: flip rates must lie in [0, 1], found {bad[0]}")
        return cls(ids, rates, glob)


def fold(eps: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign, eps') with eps' = min(eps, 1 - eps, cap) and sign -1 where eps > 1/2 (the label is read
    reversed): Robust-DPO(sign * h, eps') is Robust-DPO(h, eps) with the variance capped."""
    flip = eps > 0.5
    sign = torch.where(flip, -1.0, 1.0).to(eps.dtype)
    return sign, torch.where(flip, 1.0 - eps, eps).clamp(max=cap)
