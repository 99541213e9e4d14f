"""Baselines trained by the same trainer (docs/method.md, "Baselines"), in the ``logit = beta * h`` convention.

Robust-DPO (Chowdhury et al. 2024), assumed flip rate eps:
    L = ((1 - eps) * -log sig(logit) - eps * -log sig(-logit)) / (1 - 2 eps)
conservative DPO (label smoothing eps):
    L = (1 - eps) * -log sig(logit) + eps * -log sig(-logit)
IPO (Azar et al. 2023):   L = (h - 1/(2 beta))^2
hinge (SLiC):             L = max(0, 1 - logit)
SFT on chosen:            L = e_theta(z_w), the plain diffusion loss on winners (no reference)
"""

from __future__ import annotations

import torch

from pipeline.losses.dpo import neg_log_sigmoid


def robust_dpo_loss(h: torch.Tensor, beta: float, eps: float | torch.Tensor) -> torch.Tensor:
    """eps: one rate, or one per pair ([B], each in [0, 0.5): pipeline.losses.flip_rates.fold)."""
    if not isinstance(eps, torch.Tensor) and not 0 <= eps < 0.5:
        raise ValueError(f"eps: robust DPO needs 0 <= eps < 0.5, got {eps}")
    x = beta * h.float()
    return ((1 - eps) * neg_log_sigmoid(x) - eps * neg_log_sigmoid(-x)) / (1 - 2 * eps)


def conservative_dpo_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    x = beta * h.float()
    return (1 - eps) * neg_log_sigmoid(x) + eps * neg_log_sigmoid(-x)


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    return (h.float() - 1.0 / (2.0 * beta)).pow(2)


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.relu(1.0 - beta * h.float())


def sft_loss(policy_w: torch.Tensor) -> torch.Tensor:
    """The diffusion loss on winners, [B]; needs neither the reference nor the losers."""
    return policy_w.float()
