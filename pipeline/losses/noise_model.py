"""EM-DPO: DPO under a label-flip model whose rates are estimated during training (docs/method.md).

The observed label of pair i (annotator a) is the true preference, flipped with probability eps_a.
Under the policy, the label is right with probability p_i = sigmoid(tau * z_i), z_i = beta h_i, tau a
temperature fitted to the margins (the policy's logits are not calibrated probabilities). Then

    q_i   = eps_a (1 - p_i) / ((1 - eps_a) p_i + eps_a (1 - p_i))   posterior that the label is flipped
    L_i   = (1 - q_i) * -log sigmoid(z_i) + q_i * -log sigmoid(-z_i)  q_i detached (the EM surrogate:
            conservative DPO's label smoothing with a per-pair q, baselines.conservative_dpo_loss)

With tau = 1 the gradient of L_i equals that of the marginal likelihood -log((1 - eps) sig(z) + eps
sig(-z)): a pair the policy confidently contradicts stops pulling (q -> 1 turns it round), so the
saturation that hurts DPO under noise goes, and no flip rate is given.

The rates come from Dawid-Skene-style EM over the pairs seen so far: each observed pair leaves its
evidence p_i (computed with the policy *before* its update on that pair, so on first visit an
out-of-sample prediction), and after every micro-step

    E: q_i from p_i and the current rates
    M: eps   = mean q (capped at max_rate < 0.5: the majority defines the label)
       eps_a = (sum_{i in a} q_i + k eps) / (n_a + k)   k = prior_pairs pseudo-pairs at the global rate

warm-started, ``em_iters`` times. A pair seen while the policy knew nothing has p = 1/2 and moves no
rate, so early evidence is harmless. An annotator's rate may exceed 1/2: one who labels against the
majority is read reversed, not merely ignored. tau maximises the mixture likelihood
sum log((1 - eps_a) sigmoid(tau z) + eps_a sigmoid(-tau z)) over the last ``calib_window`` pairs
(golden-section search on log tau).

All of it is numpy on the gathered per-pair values every rank sees, so the state is identical on
every rank and is saved with each checkpoint (an exact resume).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.schema.objective import NoiseConfig

# tau <= 1: the evidence is never sharper than the loss's own logit (a larger tau lets EM explain the
# labels by the policy's signs alone, q in {0, 1}: the policy would then train on its own mistakes)
TAU_RANGE = (1e-3, 1.0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # exact for large |x|, no overflow warning


def posterior_flip(p_right: np.ndarray | torch.Tensor, eps):
    """q = P(label flipped | evidence): p_right = P(label right | not flipped), eps = the flip rate."""
    num = eps * (1 - p_right)
    return num / (num + (1 - eps) * p_right)


def mixture_loglik(tau: float, z: np.ndarray, eps: np.ndarray) -> float:
    p = sigmoid(tau * z)
    return float(np.sum(np.log(np.maximum((1 - eps) * p + eps * (1 - p), 1e-300))))


def fit_temperature(z: np.ndarray, eps: np.ndarray, iters: int = 40) -> float:
    """argmax over tau in TAU_RANGE of the mixture likelihood (golden-section search on log tau).
    Margins that are all 0 leave it flat: any tau, and every p is 1/2."""
    lo, hi = np.log(TAU_RANGE[0]), np.log(TAU_RANGE[1])
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = mixture_loglik(np.exp(a), z, eps), mixture_loglik(np.exp(b), z, eps)
    for _ in range(iters):
        if fa < fb:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = mixture_loglik(np.exp(b), z, eps)
        else:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = mixture_loglik(np.exp(a), z, eps)
    return float(np.exp((lo + hi) / 2))


def fit_flip_rates(
    z: np.ndarray, user_ids: np.ndarray, prior_pairs: float = 4.0, max_rate: float = 0.49, rounds: int = 10
) -> dict:
    """The same label-flip model fitted once, after training, to a run's per-pair logits z = beta h (the
    evaluation report's audit for any objective; em_dpo fits it as it trains): temperature and rates
    alternate ``rounds`` times, 20 EM iterations each. Each annotator's rate is shrunk toward the
    global one with the weight of ``prior_pairs`` pairs, so one with a handful of labels stays near it
    instead of a confident 0 or 1. Returns {"rate", "tau", "users", "user_rate", "pairs"} (numpy)."""
    z = np.asarray(z, dtype=np.float64)
    ok = np.isfinite(z)
    z, user_ids = z[ok], np.asarray(user_ids)[ok].astype(np.int64)
    users, idx = np.unique(user_ids, return_inverse=True)
    counts = np.bincount(idx, minlength=len(users)).astype(np.float64)
    rate, user_rate, tau = 0.1, np.full(len(users), 0.1), 1.0
    for _ in range(rounds):
        tau = fit_temperature(z, user_rate[idx])
        p = sigmoid(tau * z)
        for _ in range(20):
            q = posterior_flip(p, user_rate[idx])
            rate = float(min(q.mean(), max_rate)) if len(q) else rate
            sums = np.bincount(idx, weights=q, minlength=len(users))
            user_rate = np.clip((sums + prior_pairs * rate) / (counts + prior_pairs), 1e-6, 1 - 1e-6)
    return {"rate": rate, "tau": tau, "users": users, "user_rate": user_rate, "pairs": counts}


class FlipRateEstimator:
    """The EM state: every observed pair's evidence p (float64) and annotator index, the global rate,
    one rate per annotator, the temperature and the recent margins it is fitted on."""

    def __init__(self, cfg: NoiseConfig):
        self.cfg = cfg
        self.p = np.zeros(0)  # evidence per observed pair
        self.user_idx = np.zeros(0, dtype=np.int64)  # index into self.users
        self.users = np.zeros(0, dtype=np.int64)  # user_id per index, in first-seen order
        self.user_rate = np.zeros(0)
        self.index: dict[int, int] = {}
        self.recent_z = np.zeros(0)
        self.recent_idx = np.zeros(0, dtype=np.int64)
        self.rate = cfg.init_rate
        self.tau = 1.0
        self.seen = 0  # pairs observed, warm-up included

    @property
    def active(self) -> bool:
        return self.seen >= self.cfg.warmup_pairs

    def _indices(self, user_ids: np.ndarray, add: bool) -> np.ndarray:
        out = np.empty(len(user_ids), dtype=np.int64)
        for j, u in enumerate(user_ids.tolist()):
            i = self.index.get(int(u), -1)
            if i < 0 and add:
                i = self.index[int(u)] = len(self.users)
                self.users = np.append(self.users, int(u))
                self.user_rate = np.append(self.user_rate, self.rate)
            out[j] = i
        return out

    def rates_for(self, user_ids: np.ndarray) -> np.ndarray:
        """Each pair's flip rate: its annotator's (the global one for an unseen annotator, or with
        per_annotator off)."""
        if not self.cfg.per_annotator:
            return np.full(len(user_ids), self.rate)
        idx = self._indices(np.asarray(user_ids), add=False)
        out = np.full(len(idx), self.rate)
        out[idx >= 0] = self.user_rate[idx[idx >= 0]]
        return out

    def p_right(self, z: np.ndarray) -> np.ndarray:
        return sigmoid(self.tau * z) if self.cfg.calibrate else sigmoid(z)

    def observe(self, z: np.ndarray, user_ids: np.ndarray) -> None:
        """One micro-step's pairs (every rank's, the same on all ranks): their logits z = beta h from
        the forward before the update, and their annotators."""
        z = np.asarray(z, dtype=np.float64)
        ok = np.isfinite(z)
        z, user_ids = z[ok], np.asarray(user_ids)[ok]
        self.seen += len(z)
        idx = self._indices(user_ids, add=True)
        c = self.cfg
        self.recent_z = np.concatenate([self.recent_z, z])[-c.calib_window :]
        self.recent_idx = np.concatenate([self.recent_idx, idx])[-c.calib_window :]
        if not self.active:
            return
        if c.calibrate:
            self.tau = fit_temperature(self.recent_z, self._rates_at(self.recent_idx))
        self.p = np.concatenate([self.p, self.p_right(z)])[-c.history :]
        self.user_idx = np.concatenate([self.user_idx, idx])[-c.history :]
        self.em(c.em_iters)

    def _rates_at(self, idx: np.ndarray) -> np.ndarray:
        return self.user_rate[idx] if self.cfg.per_annotator else np.full(len(idx), self.rate)

    def em(self, iters: int) -> None:
        c = self.cfg
        n_users = len(self.users)
        counts = np.bincount(self.user_idx, minlength=n_users).astype(np.float64)
        for _ in range(iters):
            q = posterior_flip(self.p, self._rates_at(self.user_idx))
            self.rate = float(min(q.mean(), c.max_rate)) if len(q) else self.rate
            if c.per_annotator:
                sums = np.bincount(self.user_idx, weights=q, minlength=n_users)
                self.user_rate = (sums + c.prior_pairs * self.rate) / (counts + c.prior_pairs)
                self.user_rate = np.clip(self.user_rate, 1e-6, 1 - 1e-6)

    # ---- checkpoint state (tensors only: safetensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "p": torch.from_numpy(self.p.copy()),
            "user_idx": torch.from_numpy(self.user_idx.copy()),
            "users": torch.from_numpy(self.users.copy()),
            "user_rate": torch.from_numpy(self.user_rate.astype(np.float64)),
            "recent_z": torch.from_numpy(self.recent_z.copy()),
            "recent_idx": torch.from_numpy(self.recent_idx.copy()),
            "scalars": torch.tensor([self.rate, self.tau, float(self.seen)], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        need = {"p", "user_idx", "users", "user_rate", "recent_z", "recent_idx", "scalars"}
        if set(state) != need:
            raise ValueError(
                f"em_dpo state: expected tensors {sorted(need)}, the checkpoint holds {sorted(state)}"
            )
        self.p = state["p"].numpy().astype(np.float64)
        self.user_idx = state["user_idx"].numpy().astype(np.int64)
        self.users = state["users"].numpy().astype(np.int64)
        self.user_rate = state["user_rate"].numpy().astype(np.float64)
        self.recent_z = state["recent_z"].numpy().astype(np.float64)
        self.recent_idx = state["recent_idx"].numpy().astype(np.int64)
        self.index = {int(u): i for i, u in enumerate(self.users.tolist())}
        rate, tau, seen = state["scalars"].tolist()
        self.rate, self.tau, self.seen = rate, tau, int(seen)
