"""Config of the training objective (``objective.*`` in a train config). Formulas: pipeline/losses/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ObjectiveName = Literal[
    "dpo", "adaptive_dpo", "robust_dpo", "cdpo", "ipo", "adaptive_ipo", "hinge", "sft", "bounded_dpo"
]


@dataclass
class AdaptiveConfig:
    rho: float = 15.0  # g_m = rho * h_m (see g_scale)
    g_scale: Literal["raw", "logit", "standardized"] = (
        "raw"  # g = rho h | rho beta h | rho (h - batch mean) / batch std
    )
    score: Literal["cs", "c", "s"] = "cs"  # u = s c (paper) | c only | s only
    spread: Literal["variance", "std_clamped"] = "variance"  # paper: variance; authors' code: std capped at 1
    normalize: bool = False  # divide u by the batch mean of s (authors' code option)
    weight: Literal["linear", "square", "sqrt", "sigmoid"] = "linear"
    k1: float = 10.0  # SD1.5: 10, SDXL: 1 (paper)
    margin: Literal["none", "linear", "quadratic"] = "quadratic"
    k2: float | None = None  # null: -1/beta (authors' code)
    c2: float | Literal["batch_mean", "batch_mean_logit"] = "batch_mean"  # batch_mean: mean h_theta, detached
    renormalize: bool = False  # W / batch mean of W: reweights pairs without shrinking the step
    warmup_steps: int = 0  # optimizer steps of plain DPO (W = 1, G = 0) before the metric is used

    def check(self) -> list[str]:
        errs = []
        if self.rho <= 0:
            errs.append(f"rho: must be > 0, got {self.rho}")
        if self.k1 < 0:
            errs.append(f"k1: must be >= 0, got {self.k1}")
        if self.warmup_steps < 0:
            errs.append(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        return errs


@dataclass
class ObjectiveConfig:
    name: ObjectiveName = "dpo"  # see "Objectives" for each formula
    beta: float = 1000.0  # logit = beta * h (Diffusion-DPO's beta_dpo 5000 == 2500 here)
    eps: float = 0.1  # robust_dpo: assumed flip rate; cdpo: label smoothing
    bounded_k: float = 1.0  # bounded_dpo: W = stopgrad(1 / (1 + k |beta h|)), no EMA models
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)

    def check(self) -> list[str]:
        errs = []
        if self.beta <= 0:
            errs.append(f"beta: must be > 0, got {self.beta}")
        if self.name == "robust_dpo" and not 0 <= self.eps < 0.5:
            errs.append(f"eps: robust_dpo needs 0 <= eps < 0.5, got {self.eps}")
        if self.name == "cdpo" and not 0 <= self.eps <= 1:
            errs.append(f"eps: cdpo needs 0 <= eps <= 1, got {self.eps}")
        return errs
