"""Diffusion-DPO (Wallace et al., CVPR 2024), in the ``logit = beta * h`` convention (docs/method.md, "Notation").

    d_m    = e_m(z_w) - e_m(z_l)
    h      = d_ref - d_theta        > 0: the policy prefers the winner more than the reference does
    logit  = beta * h
    L_DPO  = -log sigmoid(logit)    per pair; the caller takes the batch mean

Scale: the official Diffusion-DPO code writes ``-0.5 * beta_dpo * (model_diff - ref_diff)`` with
beta_dpo = 5000, i.e. beta = 2500 here; the Adaptive-DPO paper uses beta = 1000 (SD1.5) / 2500 (SDXL)
in this convention. Losses are computed in float32, so fp16/bf16 inputs with |logit| ~ 1e4 stay finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.diffusion import PairErrors


def preference_h(policy: PairErrors, ref: PairErrors) -> torch.Tensor:
    """h = d_ref - d_theta, [B] float32 (gradient flows through ``policy``)."""
    return ref.d.float() - policy.d.float()


def neg_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(x) = softplus(-x), stable for large |x|."""
    return F.softplus(-x.float())


def implicit_accuracy(h: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if h > 0, 0.5 on a tie, 0 otherwise."""
    return (h > 0).float() + 0.5 * (h == 0).float()


def dpo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair L_DPO = -log sigmoid(beta * h)."""
    return neg_log_sigmoid(beta * h.float())


def rewards(policy: PairErrors, ref: PairErrors) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards of winner and loser: e_ref - e_theta each, [B] (detached)."""
    return (ref.w - policy.w).detach().float(), (ref.l - policy.l).detach().float()
