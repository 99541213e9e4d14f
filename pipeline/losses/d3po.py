"""D3PO (Yang et al., CVPR 2024): the per-pair loss at one denoising step (docs/method.md, "D3PO").

For a preferred trajectory ``w`` and a rejected one ``l`` (same prompt, same initial noise), at one
trained step, with ``logp_m`` the log-density of the stored transition ``x_t -> x_{t-1}``
(``pipeline.d3po.ddim``: averaged over latent elements) under the policy and the frozen reference:

    log r_m = clamp(logp_policy_m - logp_ref_m, log(1 - eps), log(1 + eps))     m in (w, l)
    h       = log r_w - log r_l        (> 0: the policy prefers the winner more than the reference does)
    loss    = -log sigmoid(beta * h)                                 beta = 0.1, eps = 0.1 (authors')

which is the authors' ``r_m = clamp(exp(logp_policy_m - logp_ref_m), 1 - eps, 1 + eps)`` and
``-log sigmoid(beta (log r_w - log r_l))`` (scripts/train.py of yk7333/D3PO) with the clamp moved into
log space: the same value and the same gradient (1 inside the band, 0 outside, since log is monotone),
but no ``0 * inf = nan`` gradient when ``exp`` overflows float32 for a log-ratio above ~88 (a policy far
from the reference on a low-noise step, where std is ~0.02). A tie (no preference) multiplies the logit
by 0, as the authors' +-1/0 labels do: its loss is log 2 and its gradient exactly 0, and it still counts
in the batch mean, as in their code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.losses.dpo import implicit_accuracy, neg_log_sigmoid


@dataclass
class TransitionLogProbs:
    """Log-densities of one stored transition of each trajectory of a pair, [B] each (float32): the
    policy's (with a gradient) and the reference's (without); ``tie`` [B] bool marks pairs with no
    preference (a label of 0.5), which train nothing."""

    policy_w: torch.Tensor
    ref_w: torch.Tensor
    policy_l: torch.Tensor
    ref_l: torch.Tensor
    tie: torch.Tensor | None = None
    # Adaptive-D3PO: [M, B] the trajectory's summed log-ratio margin under the policy and each EMA model
    # (sum over every transition of (logp_m - logp_ref) for w minus the same for l; detached), or None
    h_models: torch.Tensor | None = None


@dataclass
class D3POTerms:
    loss: torch.Tensor  # [B] per-pair loss (gradient through the policy's log-probs)
    log_ratio_w: torch.Tensor  # [B] logp_policy_w - logp_ref_w, unclamped, detached
    log_ratio_l: torch.Tensor  # [B]
    clipped_w: torch.Tensor  # [B] bool: the clamp is active (the ratio is outside [1 - eps, 1 + eps])
    clipped_l: torch.Tensor  # [B] bool
    logit: torch.Tensor  # [B] beta * (log r_w - log r_l) with the clamped ratios, 0 on ties, detached


def clamped_log_ratio(logp_policy: torch.Tensor, logp_ref: torch.Tensor, eps: float) -> torch.Tensor:
    """log clamp(exp(logp_policy - logp_ref), 1 - eps, 1 + eps), in log space, float32 [B]."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps: the ratio clamp needs 0 < eps < 1, got {eps}")
    d = logp_policy.float() - logp_ref.float().detach()
    return d.clamp(math.log1p(-eps), math.log1p(eps))


def d3po_terms(
    logps: TransitionLogProbs,
    beta: float,
    eps: float,
    W: torch.Tensor | None = None,
    G: torch.Tensor | None = None,
) -> D3POTerms:
    """The per-pair loss and what to log about it (``d3po_loss`` is its ``loss``). Adaptive-D3PO passes
    a per-pair weight ``W`` and margin ``G`` (detached): ``-W log sigmoid(logit - G)``."""
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    lr_w = clamped_log_ratio(logps.policy_w, logps.ref_w, eps)
    lr_l = clamped_log_ratio(logps.policy_l, logps.ref_l, eps)
    raw_w = (logps.policy_w.float() - logps.ref_w.float()).detach()
    raw_l = (logps.policy_l.float() - logps.ref_l.float()).detach()
    pref = torch.ones_like(lr_w) if logps.tie is None else (~logps.tie.bool()).float()
    logit = beta * (lr_w - lr_l) * pref
    lo, hi = math.log1p(-eps), math.log1p(eps)
    loss = neg_log_sigmoid(logit if G is None else logit - G.detach())
    return D3POTerms(
        loss=loss if W is None else W.detach() * loss,
        log_ratio_w=raw_w,
        log_ratio_l=raw_l,
        clipped_w=(raw_w < lo) | (raw_w > hi),
        clipped_l=(raw_l < lo) | (raw_l > hi),
        logit=logit.detach(),
    )


def d3po_loss(logps: TransitionLogProbs, beta: float = 0.1, eps: float = 0.1) -> torch.Tensor:
    """Per-pair D3PO loss [B] at one timestep; the caller takes the batch mean."""
    return d3po_terms(logps, beta, eps).loss


def d3po_stats(terms: D3POTerms, tie: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-pair statistics [B], detached: ``h`` = log-ratio margin (unclamped), ``accuracy`` = implicit
    accuracy on it (1 if h > 0, 0.5 at h = 0; NaN on ties, which have no right answer), the log-ratios,
    the loss's ``logit`` and ``clip_frac`` (the share of the pair's two ratios the clamp holds: 0, 0.5, 1;
    its batch mean is the fraction of clamped ratios)."""
    h = terms.log_ratio_w - terms.log_ratio_l
    acc = implicit_accuracy(h)
    if tie is not None:
        acc = torch.where(tie.bool(), torch.full_like(acc, float("nan")), acc)
    return {
        "h": h,
        "accuracy": acc,
        "logit": terms.logit,
        "log_ratio_w": terms.log_ratio_w,
        "log_ratio_l": terms.log_ratio_l,
        "clip_frac": (terms.clipped_w.float() + terms.clipped_l.float()) / 2,
        "tie": torch.zeros_like(h) if tie is None else tie.bool().float(),
    }


def trajectory_margin(sum_m: torch.Tensor, sum_ref: torch.Tensor, w_first: torch.Tensor) -> torch.Tensor:
    """Adaptive-D3PO's h of one model for a pair: the log-likelihood ratio of the whole trajectory (the
    sum of its per-transition log-densities, [B, 2] in group order i, j) against the reference's, for
    the winner minus for the loser. The trajectory analogue of Diffusion-DPO's h; unclamped, detached."""
    d = (sum_m.float() - sum_ref.float()).detach()
    return torch.where(w_first, d[:, 0] - d[:, 1], d[:, 1] - d[:, 0])


def trained_timesteps(num_steps: int, fraction: float) -> int:
    """How many of a trajectory's ``num_steps`` transitions train: the authors' ``int(num_steps *
    fraction)``, at least 1 (a tiny fraction would otherwise train nothing), with a 1e-9 slack so that
    a fraction written in decimal gives the intended count (50 * 0.58 is 28.999... in floating point)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"timestep_fraction: must be in (0, 1], got {fraction}")
    return max(1, min(num_steps, int(num_steps * fraction + 1e-9)))
