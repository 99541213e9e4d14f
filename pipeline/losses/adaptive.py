"""Adaptive-DPO (Zhang et al., 2025, "When Preferences Diverge") (docs/method.md).

M models: the policy theta and M-1 EMA copies of it. For each pair and model, h_m = d_ref - d_m and
g_m = rho * h_m (no gradient; ``g_scale`` also offers rho * beta * h_m, the logit scale, and
rho * (h_m - batch mean) / batch std). Then

    c(x) = 1 - (1/M) sum_m sigmoid(g_m)     intra-annotator confidence (large: models disagree with the label),
                                            computed as (1/M) sum_m sigmoid(-g_m) in float64 (no cancellation)
    s(x) = spread of g_m over the M models  inter-annotator stability
           "variance":    sample variance (the paper)
           "std_clamped": sample std, capped at 1 (the authors' code; we read "clamped at 1" as min(std, 1))
           ``spread_of``: of g_m (the authors' code) or of the unscaled h_m (the paper's Eq. 12, so that rho
           enters c only); "h" is the unscaled h_m whatever ``g_scale``
    u(x) = s(x) * c(x)                      minority score (or c or s alone: ``score``); optionally / batch
                                            mean of s ("normalize")
    W(x) = stopgrad(weight(u))              linear 1/(1+k1 u) | square 1/(1+k1 u^2) | sqrt 1/(1+k1 sqrt u)
                                            | sigmoid 1/(1+exp(k1 u))
    G(x) = stopgrad(margin(u))              none 0 | linear k2 u + c2 | quadratic k2 u^2 + c2
    L    = -W log sigmoid(beta h_theta - G)      (``renormalize``: W / batch mean of W)

k2 defaults to -1/beta and c2 to the detached batch mean of h_theta (the authors' code), so majority
pairs (small u) get the larger margin; c2 may be a float, or the batch mean of the logit instead.
Adaptive-IPO: W (h_theta - G/beta - 1/(2 beta))^2, the margin moved to the h scale (``ipo_margin``
"logit"), or W (h_theta - G - 1/(2 beta))^2 as the paper's Appendix E writes it (``ipo_margin`` "h").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.losses.dpo import neg_log_sigmoid
from pipeline.schema.objective import AdaptiveConfig


@dataclass
class MinorityScore:
    u: torch.Tensor  # [B] minority score
    c: torch.Tensor  # [B] intra-annotator confidence term
    s: torch.Tensor  # [B] inter-annotator stability (spread) term


def scaled_g(h_models: torch.Tensor, rho: float, g_scale: str = "raw", beta: float = 1.0) -> torch.Tensor:
    """g_m from h_m, [M, B]: ``raw`` rho h (the paper), ``logit`` rho beta h (h on the loss's logit
    scale), ``standardized`` rho (h - mean) / std with each model's mean and std over the batch."""
    h = h_models.detach().float()
    if g_scale == "raw":
        return rho * h
    if g_scale == "logit":
        return rho * beta * h
    if g_scale == "standardized":
        if h.shape[1] < 2:
            raise ValueError("g_scale=standardized needs at least 2 pairs per batch")
        return rho * (h - h.mean(dim=1, keepdim=True)) / h.std(dim=1, keepdim=True).clamp_min(1e-12)
    raise ValueError(f"g_scale {g_scale!r}: expected raw, logit or standardized")


def minority_score(
    h_models: torch.Tensor,
    rho: float,
    spread: str = "variance",
    normalize: bool = False,
    g_scale: str = "raw",
    beta: float = 1.0,
    score: str = "cs",
    spread_of: str = "g",
) -> MinorityScore:
    """h_models: [M, B] (policy first, then the EMA models), M >= 2. No gradient flows through the result.
    ``score`` picks u = s c (the paper), c alone or s alone; ``spread_of`` takes s over g_m ("g") or over
    the unscaled h_m ("h"). c and u are computed in float64 (c ~ exp(-g) for large g) and returned as
    float32, like s."""
    if h_models.dim() != 2 or h_models.shape[0] < 2:
        raise ValueError(
            f"h_models: expected [M, B] with M >= 2 models (policy + EMA), got {tuple(h_models.shape)}"
        )
    g = scaled_g(h_models, rho, g_scale, beta)
    # 1 - mean sigmoid(g) rounds to exactly 0 in float32 once every g > ~17; mean sigmoid(-g) does not
    c = torch.sigmoid(-g.double()).mean(dim=0)
    if spread_of == "g":
        x = g
    elif spread_of == "h":
        x = h_models.detach().float()
    else:
        raise ValueError(f"spread_of {spread_of!r}: expected g or h")
    if spread == "variance":
        s = x.var(dim=0, unbiased=True)
    elif spread == "std_clamped":
        s = x.std(dim=0, unbiased=True).clamp(max=1.0)
    else:
        raise ValueError(f"spread {spread!r}: expected variance or std_clamped")
    s64 = s.double()
    u = {"cs": s64 * c, "c": c, "s": s64}.get(score)
    if u is None:
        raise ValueError(f"score {score!r}: expected cs, c or s")
    if normalize:
        u = u / s64.mean().clamp_min(torch.finfo(torch.float32).tiny)
    return MinorityScore(u=u.to(g.dtype), c=c.to(g.dtype), s=s)


def weight(u: torch.Tensor, kind: str, k1: float) -> torch.Tensor:
    if kind == "linear":
        w = 1.0 / (1.0 + k1 * u)
    elif kind == "square":
        w = 1.0 / (1.0 + k1 * u.pow(2))
    elif kind == "sqrt":
        w = 1.0 / (1.0 + k1 * u.clamp_min(0).sqrt())
    elif kind == "sigmoid":
        w = 1.0 / (1.0 + torch.exp(k1 * u))
    else:
        raise ValueError(f"weight {kind!r}: expected linear, square, sqrt or sigmoid")
    return w.detach()


def margin(u: torch.Tensor, kind: str, k2: float, c2: float | torch.Tensor) -> torch.Tensor:
    if kind == "none":
        g = torch.zeros_like(u)
    elif kind == "linear":
        g = k2 * u + c2
    elif kind == "quadratic":
        g = k2 * u.pow(2) + c2
    else:
        raise ValueError(f"margin {kind!r}: expected none, linear or quadratic")
    return g.detach()


def resolve_c2(c2: float | str, h_theta: torch.Tensor, beta: float) -> float | torch.Tensor:
    """c2 as configured: a float, "batch_mean" (mean h_theta, detached) or "batch_mean_logit" (mean beta h)."""
    if c2 == "batch_mean":
        return h_theta.detach().float().mean()
    if c2 == "batch_mean_logit":
        return beta * h_theta.detach().float().mean()
    return float(c2)


def renormalize(W: torch.Tensor) -> torch.Tensor:
    """W / batch mean of W (detached): the relative weighting stays, the mean step size does not shrink."""
    return (W / W.mean().clamp_min(torch.finfo(torch.float32).tiny)).detach()


def adaptive_weights(
    h_models: torch.Tensor, h_theta: torch.Tensor, a: AdaptiveConfig, beta: float
) -> tuple[torch.Tensor, torch.Tensor, MinorityScore]:
    """W and G of ``objective.adaptive`` (``a``), both detached, and the minority score they come from:
    u from the models' margins ``h_models`` [M, B] (policy first, then the EMA models), W = weight(u)
    (renormalised if asked), G = margin(u) with k2 (default -1/beta) and c2 resolved on ``h_theta`` [B].
    Adaptive-DPO and Adaptive-D3PO both weigh their pairs through it."""
    ms = minority_score(h_models, a.rho, a.spread, a.normalize, a.g_scale, beta, a.score, a.spread_of)
    W = weight(ms.u, a.weight, a.k1)
    if a.renormalize:
        W = renormalize(W)
    k2 = -1.0 / beta if a.k2 is None else a.k2
    G = margin(ms.u, a.margin, k2, resolve_c2(a.c2, h_theta, beta))
    return W, G, ms


def bounded_weight(h: torch.Tensor, beta: float, k: float) -> torch.Tensor:
    """The control without EMA models: W = stopgrad(1 / (1 + k |beta h|))."""
    return (1.0 / (1.0 + k * (beta * h.detach().float()).abs())).detach()


def adaptive_dpo_loss(h_theta: torch.Tensor, beta: float, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Per-pair -W log sigmoid(beta h_theta - G); W and G must already be detached."""
    return W * neg_log_sigmoid(beta * h_theta.float() - G)


def adaptive_ipo_loss(
    h_theta: torch.Tensor, beta: float, W: torch.Tensor, G: torch.Tensor, ipo_margin: str = "logit"
) -> torch.Tensor:
    """Per-pair W (h_theta - G/beta - 1/(2 beta))^2 (``ipo_margin`` "logit": G is on the logit scale, as in
    Adaptive-DPO's loss, and is moved to the h scale), or W (h_theta - G - 1/(2 beta))^2 ("h": the paper's
    Appendix E, G taken on the h scale as it is)."""
    if ipo_margin == "logit":
        G = G / beta
    elif ipo_margin != "h":
        raise ValueError(f"ipo_margin {ipo_margin!r}: expected logit or h")
    return W * (h_theta.float() - G - 1.0 / (2.0 * beta)).pow(2)
