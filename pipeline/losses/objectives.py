"""Every training objective as a small object the trainer picks by config (``objective.name``).

An objective takes the per-pair errors of the models the step ran (policy, reference, EMA models)
and returns per-pair losses plus per-pair statistics to log; the trainer takes the mean. It also
says what it needs, so the trainer runs only those forwards: ``needs_reference``, ``needs_losers``,
``uses_ema`` (whether it ever reads EMA models) and ``ema_active`` (whether it reads them at this step).

Objectives whose loss changes with training progress decide it themselves: the trainer calls
``begin_step(step)`` with the optimizer step about to be taken (the engine's step count, restored by a
resume), on every rank. The adaptive objectives use it for their warm-up (``objective.adaptive.
warmup_steps``): plain DPO / D3PO (W = 1, G = 0, no EMA forwards) before it, the minority metric after.

Stateful objectives (e.g. one that estimates label-flip rates per annotator during training) use
three hooks, no-ops here: ``batch_fields`` names the per-pair batch fields the loss reads (they
arrive in ``ModelErrors.fields``, e.g. ``user_id`` [B] int64); ``observe(stats)`` is called after
every micro-step on every rank with the same all-rank per-pair values, so the state stays identical
across ranks without a collective of its own; ``state_dict()`` / ``load_state_dict()`` carry the
state through checkpoints (tensors, written with safetensors: a resume is exact, also on another
number of ranks, since the state does not depend on the rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.losses.adaptive import adaptive_dpo_loss, adaptive_ipo_loss, adaptive_weights, bounded_weight
from pipeline.losses.baselines import conservative_dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss, sft_loss
from pipeline.losses.d3po import TransitionLogProbs, clamped_log_ratio, d3po_stats, d3po_terms
from pipeline.losses.diffusion import PairErrors
from pipeline.losses.dpo import dpo_loss, implicit_accuracy, preference_h, rewards
from pipeline.losses.flip_rates import FlipRateTable, fold
from pipeline.losses.noise_model import FlipRateEstimator, posterior_flip
from pipeline.schema.objective import ObjectiveConfig


@dataclass
class ModelErrors:
    policy: PairErrors
    ref: PairErrors | None = None
    ema: list[PairErrors] = field(default_factory=list)
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # Objective.batch_fields, [B] each


@dataclass
class LossOutput:
    loss: torch.Tensor  # [B] per-pair loss (the only tensor with a gradient)
    stats: dict[str, torch.Tensor]  # name -> [B], detached


class Objective:
    needs_reference = True
    needs_losers = True
    uses_ema = False
    # which workload feeds it (pipeline.train.registry.WORKLOADS): "pairs" = encoded pair shards
    data_kind = "pairs"
    # per-pair stats that are logged as distributions too (std and histogram), when present
    distributions: tuple[str, ...] = ("h", "u", "W", "G")
    # per-pair batch fields the loss reads (e.g. "user_id"), given in ModelErrors.fields on the device
    batch_fields: tuple[str, ...] = ()

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.beta = cfg.beta
        self.begin_step(0)

    def begin_step(self, step: int) -> None:
        """Before the micro-steps of optimizer step ``step`` (0-based: the engine's ``global_steps``, which
        a resume restores), on every rank. A new objective stands at step 0. Nothing to decide here."""

    @property
    def ema_active(self) -> bool:
        """Whether the loss reads the EMA models at this step: the step runs their forwards only then."""
        return self.uses_ema

    def _pairwise(self, errors: ModelErrors) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if errors.ref is None:
            raise ValueError(f"objective {self.cfg.name} needs the reference model's errors")
        h = preference_h(errors.policy, errors.ref)
        rw, rl = rewards(errors.policy, errors.ref)
        stats = {
            "h": h.detach(),
            "logit": self.beta * h.detach(),
            "accuracy": implicit_accuracy(h.detach()),
            "reward_w": rw,
            "reward_l": rl,
            "reward_margin": rw - rl,
        }
        return h, stats

    def __call__(self, errors: ModelErrors) -> LossOutput:
        raise NotImplementedError

    @property
    def stateful(self) -> bool:
        """Whether ``observe`` learns from the per-pair values (then the trainer hands them over after
        every micro-step; otherwise once per optimizer step, with the log's)."""
        return type(self).observe is not Objective.observe

    def observe(self, stats: dict[str, np.ndarray]) -> None:
        """After every micro-step whose loss was finite, on every rank with the same values: every
        rank's per-pair values of that micro-step, concatenated in rank order (read-only): the stats
        ``__call__`` returned, ``loss``, and the workload's per-pair fields (pairs: ``user_id``
        int64, exact; ``flipped`` bool and ``true_agrees`` float are the synthetic ground truth, for
        logs only: an objective must not learn from them). Update the state here."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state a checkpoint must hold for an exact resume (CPU tensors; empty: stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(
                f"objective {self.cfg.name} keeps no state; the checkpoint holds {sorted(state)}"
            )


class DPO(Objective):
    def __call__(self, errors):
        h, stats = self._pairwise(errors)
        return LossOutput(dpo_loss(h, self.beta), stats)


class RobustDPO(Objective):
    """Robust-DPO at one assumed rate (``objective.eps``), or at each pair's annotator's measured rate
    (``objective.flip_rates``: the label export's flip_rates.json; pipeline/losses/flip_rates.py)."""

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__(cfg)
        self.table = FlipRateTable.from_file(cfg.flip_rates) if cfg.flip_rates else None
        if self.table is not None:
            self.batch_fields = ("user_id",)
            self.distributions = (*Objective.distributions, "eps_pair")

    def __call__(self, errors):
        h, stats = self._pairwise(errors)
        if self.table is None:
            return LossOutput(robust_dpo_loss(h, self.beta, self.cfg.eps), stats)
        if "user_id" not in errors.fields:
            raise ValueError("objective.flip_rates needs the batch field user_id")
        eps = self.table.lookup(errors.fields["user_id"])
        sign, eps_f = fold(eps, self.cfg.flip_rates_cap)
        stats["eps_pair"] = eps
        return LossOutput(robust_dpo_loss(sign * h, self.beta, eps_f), stats)


class ConservativeDPO(Objective):
    def __call__(self, errors):
        h, stats = self._pairwise(errors)
        return LossOutput(conservative_dpo_loss(h, self.beta, self.cfg.eps), stats)


class IPO(Objective):
    def __call__(self, errors):
        h, stats = self._pairwise(errors)
        return LossOutput(ipo_loss(h, self.beta), stats)


class Hinge(Objective):
    def __call__(self, errors):
        h, stats = self._pairwise(errors)
        return LossOutput(hinge_loss(h, self.beta), stats)


class SFT(Objective):
    needs_reference = False
    needs_losers = False

    def __call__(self, errors):
        return LossOutput(sft_loss(errors.policy.w), {"e_w": errors.policy.w.detach().float()})


class AdaptiveWarmup:
    """The adaptive objectives' warm-up: for the first ``objective.adaptive.warmup_steps`` optimizer steps
    the minority metric is off (``metric_active`` false: W = 1, G = 0, and the step runs no EMA forward);
    from then on it is on. Decided from the step alone, so a resumed run decides as the uninterrupted one."""

    cfg: ObjectiveConfig
    uses_ema = True
    metric_active: bool

    def begin_step(self, step: int) -> None:
        self.metric_active = step >= self.cfg.adaptive.warmup_steps

    @property
    def ema_active(self) -> bool:
        return self.metric_active


class AdaptiveDPO(AdaptiveWarmup, Objective):
    """Adaptive-DPO; during its warm-up (``AdaptiveWarmup``) it is plain DPO with W = 1, G = 0."""

    def weights(self, h: torch.Tensor, errors: ModelErrors) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if not self.metric_active or not errors.ema:
            nan = torch.full_like(h, float("nan")).detach()
            return torch.ones_like(h).detach(), torch.zeros_like(h).detach(), {"u": nan, "c": nan, "s": nan}
        h_ema = [preference_h(e, errors.ref) for e in errors.ema]
        h_models = torch.stack([h.detach()] + [x.detach() for x in h_ema])
        W, G, ms = adaptive_weights(h_models, h, self.cfg.adaptive, self.beta)
        extra = {"u": ms.u, "c": ms.c, "s": ms.s}
        extra.update({f"h_ema{i}": x.detach() for i, x in enumerate(h_ema)})
        return W, G, extra

    def _final(self, h, W, G):
        return adaptive_dpo_loss(h, self.beta, W, G)

    def __call__(self, errors):
        h, stats = self._pairwise(errors)
        W, G, extra = self.weights(h, errors)
        stats.update(extra, W=W, G=G)
        return LossOutput(self._final(h, W, G), stats)


class BoundedDPO(Objective):
    """Control for Adaptive-DPO without EMA models: -W log sigmoid(beta h), W = stopgrad(1/(1 + k |beta h|))."""

    def __call__(self, errors):
        h, stats = self._pairwise(errors)
        W = bounded_weight(h, self.beta, self.cfg.bounded_k)
        stats["W"] = W
        return LossOutput(W * dpo_loss(h, self.beta), stats)


class AdaptiveIPO(AdaptiveDPO):
    def _final(self, h, W, G):
        return adaptive_ipo_loss(h, self.beta, W, G, self.cfg.adaptive.ipo_margin)


class D3PO(Objective):
    """D3PO (pipeline/losses/d3po.py) on one stored transition of each trajectory of a pair. It reads
    ``TransitionLogProbs`` (the DDIM log-densities under the policy and the reference), not
    ``ModelErrors``: a trajectory workload (pipeline/train/workload.py) computes them and calls it."""

    data_kind = "trajectories"
    distributions = ("h", "log_ratio_w", "log_ratio_l")

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__(cfg)
        self.beta, self.eps = cfg.d3po.beta, cfg.d3po.eps
        self.timestep_fraction = cfg.d3po.timestep_fraction

    def __call__(self, logps: TransitionLogProbs) -> LossOutput:
        if not isinstance(logps, TransitionLogProbs):
            raise TypeError(
                f"objective d3po scores trajectory transitions (TransitionLogProbs), got {type(logps).__name__}"
            )
        terms = d3po_terms(logps, self.beta, self.eps)
        return LossOutput(terms.loss, d3po_stats(terms, logps.tie))


class AdaptiveD3PO(AdaptiveWarmup, D3PO):
    """D3PO with Adaptive-DPO's minority weighting (objective.adaptive.*): the models' margins are the
    trajectories' summed log-ratios (``TransitionLogProbs.h_models``, policy first, then the EMA models,
    computed once per micro-batch by the workload), the score u, weight W and margin G are Adaptive-DPO's
    (``pipeline.losses.adaptive.adaptive_weights``) and the loss is ``-W log sigmoid(beta (log r_w - log r_l)
    - G)``, the margin's c2 taken on the step's clamped margin. During its warm-up (``AdaptiveWarmup``), or
    without EMA models, it is plain D3PO, W = 1, G = 0."""

    distributions = ("h", "log_ratio_w", "log_ratio_l", "u", "W", "h_traj")

    def __call__(self, logps: TransitionLogProbs) -> LossOutput:
        if not isinstance(logps, TransitionLogProbs):
            raise TypeError(
                f"objective adaptive_d3po scores trajectory transitions (TransitionLogProbs), got {type(logps).__name__}"
            )
        b = logps.policy_w.shape[0]
        nan = torch.full((b,), float("nan"), device=logps.policy_w.device)
        W = G = None
        extra = {"u": nan, "c": nan, "s": nan, "h_traj": nan}
        if self.metric_active and logps.h_models is not None:
            step_h = (
                clamped_log_ratio(logps.policy_w, logps.ref_w, self.eps)
                - clamped_log_ratio(logps.policy_l, logps.ref_l, self.eps)
            ).detach()
            W, G, ms = adaptive_weights(logps.h_models, step_h, self.cfg.adaptive, self.beta)
            extra = {"u": ms.u, "c": ms.c, "s": ms.s, "h_traj": logps.h_models[0].detach().float()}
        terms = d3po_terms(logps, self.beta, self.eps, W, G)
        stats = d3po_stats(terms, logps.tie)
        ones = torch.ones_like(terms.loss).detach()
        stats.update(extra, W=ones if W is None else W, G=0 * ones if G is None else G)
        return LossOutput(terms.loss, stats)


class EMDPO(Objective):
    """DPO under an estimated label-flip model (pipeline/losses/noise_model.py): no flip rate is given;
    the global and per-annotator rates and a temperature are fitted by EM on the policy's margins as
    training goes, and each pair's loss is weighted by the posterior that its label is flipped (q,
    logged as ``u``, the pair's minority score). Plain DPO (q = 0) during ``noise.warmup_pairs``."""

    batch_fields = ("user_id",)
    distributions = ("h", "u", "eps_user")

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__(cfg)
        self.noise = FlipRateEstimator(cfg.noise)

    def __call__(self, errors):
        h, stats = self._pairwise(errors)
        if "user_id" not in errors.fields:
            raise ValueError("objective em_dpo needs the batch field user_id")
        users = errors.fields["user_id"].cpu().numpy()
        est = self.noise
        eps = est.rates_for(users)
        if est.active:
            p = est.p_right(self.beta * h.detach().double().cpu().numpy())
            q = posterior_flip(p, eps)
        else:
            q = np.zeros(len(users))
        q_t = torch.as_tensor(q, dtype=torch.float32, device=h.device)
        b = h.shape[0]
        stats.update(
            u=q_t,
            eps_user=torch.as_tensor(eps, dtype=torch.float32, device=h.device),
            eps_global=torch.full((b,), est.rate, device=h.device),
            tau=torch.full((b,), est.tau, device=h.device),
        )
        if self.cfg.noise.loss == "unbiased":
            # the global rate: Robust-DPO's estimator is unbiased per pair for any rate, but its variance
            # explodes as a rate nears 1/2, which a noisy per-annotator estimate easily does
            return LossOutput(robust_dpo_loss(h, self.beta, est.rate if est.active else 0.0), stats)
        return LossOutput(conservative_dpo_loss(h, self.beta, q_t), stats)  # smoothing by q

    def observe(self, stats):
        self.noise.observe(stats["logit"], stats["user_id"])

    def state_dict(self):
        return self.noise.state_dict()

    def load_state_dict(self, state):
        self.noise.load_state_dict(state)


# objectives fed ModelErrors by the pair workload (data_kind "pairs")
OBJECTIVES: dict[str, type[Objective]] = {
    "dpo": DPO,
    "adaptive_dpo": AdaptiveDPO,
    "robust_dpo": RobustDPO,
    "cdpo": ConservativeDPO,
    "ipo": IPO,
    "adaptive_ipo": AdaptiveIPO,
    "hinge": Hinge,
    "sft": SFT,
    "bounded_dpo": BoundedDPO,
    "em_dpo": EMDPO,
}


# objectives fed by a trajectory workload (data_kind "trajectories"): they take TransitionLogProbs
TRAJECTORY_OBJECTIVES: dict[str, type[Objective]] = {
    "d3po": D3PO,
    "adaptive_d3po": AdaptiveD3PO,
}


def build_objective(cfg: ObjectiveConfig) -> Objective:
    cls = OBJECTIVES.get(cfg.name) or TRAJECTORY_OBJECTIVES[cfg.name]
    return cls(cfg)
