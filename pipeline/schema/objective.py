"""Config of the training objective (``objective.*`` in a train config). Formulas: pipeline/losses/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Interval

from pipeline.schema.common import NonNegFloat, NonNegInt, Positive, Probability, Text

# objectives trained on encoded preference pairs (data.shards)
ObjectiveName = Literal[
    "dpo",
    "adaptive_dpo",
    "robust_dpo",
    "cdpo",
    "ipo",
    "adaptive_ipo",
    "hinge",
    "sft",
    "bounded_dpo",
    "em_dpo",
]
# objectives trained on sampled denoising trajectories (the online mode; pipeline/train/workload.py)
TrajectoryObjectiveName = Literal["d3po", "adaptive_d3po"]


@dataclass
class AdaptiveConfig:
    rho: Positive = 15.0  # g_m = rho * h_m (see g_scale)
    g_scale: Literal["raw", "logit", "standardized"] = (
        "raw"  # g = rho h | rho beta h | rho (h - batch mean) / batch std
    )
    score: Literal["cs", "c", "s"] = "cs"  # u = s c (paper) | c only | s only
    spread: Literal["variance", "std_clamped"] = "variance"  # paper: variance; authors' code: std capped at 1
    spread_of: Literal["g", "h"] = (
        "g"  # s over g_m (authors' code) | over the unscaled h_m whatever g_scale (paper, Eq. 12: rho in c only)
    )
    normalize: bool = False  # divide u by the batch mean of s (authors' code option)
    weight: Literal["linear", "square", "sqrt", "sigmoid"] = "linear"
    k1: NonNegFloat = 10.0  # SD1.5: 10, SDXL: 1 (paper)
    margin: Literal["none", "linear", "quadratic"] = "quadratic"
    k2: float | None = None  # null: -1/beta (authors' code)
    c2: float | Literal["batch_mean", "batch_mean_logit"] = (
        "batch_mean"  # batch_mean: mean h_theta, detached (authors' code); batch_mean_logit: mean beta h_theta (paper)
    )
    ipo_margin: Literal["logit", "h"] = (
        "logit"  # adaptive_ipo: h - G/beta - 1/(2 beta) (G on the logit scale) | h - G - 1/(2 beta) (paper, App. E)
    )
    renormalize: bool = False  # W / batch mean of W: reweights pairs without shrinking the step
    warmup_steps: NonNegInt = 0  # optimizer steps of plain DPO (W = 1, G = 0) before the metric is used


@dataclass
class NoiseConfig:
    """em_dpo (pipeline/losses/noise_model.py): DPO under a label-flip model whose rates are estimated
    from the policy's own margins during training (EM), globally and per annotator (``user_id``)."""

    loss: Literal["unbiased", "posterior"] = (
        "unbiased"  # Robust-DPO's loss at the estimated global rate | (1-q) DPO(label) + q DPO(reversed)
    )
    per_annotator: bool = True  # also a rate per user_id, shrunk to the global one (audit, posterior loss)
    prior_pairs: NonNegFloat = (
        10.0  # shrinkage: an annotator's rate counts prior_pairs pseudo-pairs at the global rate
    )
    calibrate: bool = True  # fit a temperature tau (P(label right) = sigmoid(tau beta h)) on recent margins
    calib_window: Annotated[int, Interval(ge=16)] = 1024  # recent pairs the temperature is fitted on
    warmup_pairs: NonNegInt = (
        512  # plain DPO (q = 0) until this many pairs were observed (margins carry no evidence yet)
    )
    init_rate: Annotated[float, Interval(gt=0, lt=0.5)] = (
        0.1  # EM's starting flip rate (any value in (0, 0.5): EM moves it)
    )
    max_rate: Annotated[float, Interval(gt=0, lt=0.5)] = (
        0.45  # cap of the global rate (< 0.5: the majority defines the label)
    )
    em_iters: Annotated[int, Interval(ge=1)] = 3  # EM iterations after each micro-step (warm-started)
    history: Annotated[int, Interval(ge=16)] = (
        2_000_000  # pairs whose evidence is kept (oldest dropped first)
    )


@dataclass
class D3POConfig:
    """D3PO's own scale and clamp (pipeline/losses/d3po.py): the log-ratios it compares are of
    per-element-averaged DDIM transition densities, nothing like Diffusion-DPO's h, so it does not
    read objective.beta / objective.eps."""

    beta: Positive = 0.1  # loss = -log sigmoid(beta (log r_w - log r_l)) (authors' train.beta)
    eps: Annotated[float, Interval(gt=0, lt=1)] = (
        0.1  # r = clamp(p_policy / p_ref, 1 - eps, 1 + eps) (authors' train.eps); 0 would freeze r at 1
    )
    timestep_fraction: Annotated[float, Interval(gt=0, le=1)] = (
        1.0  # share of each trajectory's transitions trained: int(steps * fraction), at least 1
    )


@dataclass
class ObjectiveConfig:
    name: Literal[ObjectiveName, TrajectoryObjectiveName] = "dpo"  # see "Objectives" for each formula
    beta: Positive = 1000.0  # logit = beta * h (Diffusion-DPO's beta_dpo 5000 == 2500 here)
    eps: Probability = 0.1  # robust_dpo: assumed flip rate (< 0.5); cdpo: label smoothing
    # robust_dpo: each pair at its annotator's measured flip rate instead of eps
    flip_rates: Text | None = None  # flip_rates.json of stages.label export (rates from redundant labels)
    flip_rates_cap: Annotated[float, Interval(ge=0, lt=0.5)] = (
        0.4  # folded per-pair eps capped here (variance ~ 1/(1-2 eps)^2)
    )
    bounded_k: NonNegFloat = 1.0  # bounded_dpo: W = stopgrad(1 / (1 + k |beta h|)), no EMA models
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    d3po: D3POConfig = field(default_factory=D3POConfig)  # d3po reads these, not objective.beta / eps
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # em_dpo: the estimated label-flip model

    def check(self) -> list[str]:
        errs = []
        if self.name == "robust_dpo" and not self.eps < 0.5:
            errs.append(f"eps: robust_dpo needs eps < 0.5 (it divides by 1 - 2 eps), got {self.eps}")
        if self.flip_rates is not None and self.name != "robust_dpo":
            errs.append(f"flip_rates: read by objective.name=robust_dpo only, not {self.name}")
        return errs
