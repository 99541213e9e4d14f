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

import json
import math
from pathlib import Path

import torch

from pipeline.errors import UserError


class FlipRateTable:
    def __init__(self, user_ids: list[int], rates: list[float], global_rate: float):
        order = sorted(range(len(user_ids)), key=lambda i: user_ids[i])
        self.ids = torch.tensor([user_ids[i] for i in order], dtype=torch.int64)
        self.rates = torch.tensor([rates[i] for i in order], dtype=torch.float32)
        self.global_rate = float(global_rate)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_file(cls, path: str | Path, key: str = "objective.flip_rates") -> FlipRateTable:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
            ann = d["annotators"]
            ids = [int(a["user_id"]) for a in ann]
            rates = [float(a["flip_rate"]) for a in ann]
            glob = float(d["global_flip_rate"])
        except FileNotFoundError as e:
            raise UserError(f"{key}={p}: no such file (stages.label export writes flip_rates.json)") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{key}={p}: not a flip_rates.json of stages.label export ({type(e).__name__}: {e})"
            ) from e
        if not any(int(a.get("informative", 0)) for a in ann):
            raise UserError(
                f"{key}={p}: measures nothing (no item was judged by two annotators and no check item "
                "was answered): every rate is the prior. Label with assignment.per_item >= 2 or checks.count > 0"
            )
        bad = [r for r in rates + [glob] if not (math.isfinite(r) and 0.0 <= r <= 1.0)]
        if bad:
            raise UserError(f"{key}={p}: flip rates must lie in [0, 1], found {bad[0]}")
        if len(set(ids)) != len(ids):
            raise UserError(f"{key}={p}: a user_id appears twice")
        return cls(ids, rates, glob)

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, user_ids: torch.Tensor) -> torch.Tensor:
        """[B] int64 user ids (on the compute device) -> [B] float32 rates, on that device, no host sync."""
        dev = user_ids.device
        if dev not in self._on:
            self._on[dev] = (self.ids.to(dev), self.rates.to(dev))
        ids, rates = self._on[dev]
        if len(ids) == 0:
            return torch.full(user_ids.shape, self.global_rate, dtype=torch.float32, device=dev)
        idx = torch.searchsorted(ids, user_ids).clamp_(max=len(ids) - 1)
        return torch.where(ids[idx] == user_ids, rates[idx], self.global_rate)


def fold(eps: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign, eps') with eps' = min(eps, 1 - eps, cap) and sign -1 where eps > 1/2 (the label is read
    reversed): Robust-DPO(sign * h, eps') is Robust-DPO(h, eps) with the variance capped."""
    flip = eps > 0.5
    sign = torch.where(flip, -1.0, 1.0).to(eps.dtype)
    return sign, torch.where(flip, 1.0 - eps, eps).clamp(max=cap)
