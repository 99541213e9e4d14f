"""Config of the training objective (``objective.*`` in a train config). Formulas: pipeline/losses/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.schema.common import NonNegFloat, NonNegInt, Positive, Probability

ObjectiveName = Literal[
    "dpo", "adaptive_dpo", "robust_dpo", "cdpo", "ipo", "adaptive_ipo", "hinge", "sft", "bounded_dpo"
]


@dataclass
class AdaptiveConfig:
    rho: Positive = 15.0  # g_m = rho * h_m (see g_scale)
    g_scale: Literal["raw", "logit", "standardized"] = (
        "raw"  # g = rho h | rho beta h | rho (h - batch mean) / batch std
    )
    score: Literal["cs", "c", "s"] = "cs"  # u = s c (paper) | c only | s only
    spread: Literal["variance", "std_clamped"] = "variance"  # paper: variance; authors' code: std capped at 1
    normalize: bool = False  # divide u by the batch mean of s (authors' code option)
    weight: Literal["linear", "square", "sqrt", "sigmoid"] = "linear"
    k1: NonNegFloat = 10.0  # SD1.5: 10, SDXL: 1 (paper)
    margin: Literal["none", "linear", "quadratic"] = "quadratic"
    k2: float | None = None  # null: -1/beta (authors' code)
    c2: float | Literal["batch_mean", "batch_mean_logit"] = "batch_mean"  # batch_mean: mean h_theta, detached
    renormalize: bool = False  # W / batch mean of W: reweights pairs without shrinking the step
    warmup_steps: NonNegInt = 0  # optimizer steps of plain DPO (W = 1, G = 0) before the metric is used


@dataclass
class ObjectiveConfig:
    name: ObjectiveName = "dpo"  # see "Objectives" for each formula
    beta: Positive = 1000.0  # logit = beta * h (Diffusion-DPO's beta_dpo 5000 == 2500 here)
    eps: Probability = 0.1  # robust_dpo: assumed flip rate (< 0.5); cdpo: label smoothing
    bounded_k: NonNegFloat = 1.0  # bounded_dpo: W = stopgrad(1 / (1 + k |beta h|)), no EMA models
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)

    def check(self) -> list[str]:
        if self.name == "robust_dpo" and not self.eps < 0.5:
            return [f"eps: robust_dpo needs eps < 0.5 (it divides by 1 - 2 eps), got {self.eps}"]
        return []
