"""Golden tests of every objective, with the maths worked out by hand, plus the invariants.

Conventions (docs/method.md, "Notation"): d = e(z_w) - e(z_l); h = d_ref - d_theta; logit = beta * h.
softplus(x) = log(1 + e^x), so -log sigmoid(x) = softplus(-x). Hand values used below:
    softplus(-1) = 0.31326168751822286      softplus(1) = 1.3132616875182228
    softplus(2)  = 2.1269280110429727       sigmoid(1) = 0.7310585786300049, sigmoid(3) = 0.9525741268224334
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from pipeline.losses import adaptive, baselines
from pipeline.losses.diffusion import PairErrors, pair_errors, pair_noise, training_target
from pipeline.losses.dpo import dpo_loss, implicit_accuracy, preference_h
from pipeline.losses.objectives import OBJECTIVES, ModelErrors, build_objective
from pipeline.schema.objective import AdaptiveConfig, ObjectiveConfig

SP_M1, SP_1, SP_2 = 0.31326168751822286, 1.3132616875182228, 2.1269280110429727


def T(*x):
    return torch.tensor(x, dtype=torch.float32)


def errs(w, l):  # noqa: E741
    return PairErrors(T(*w), T(*l))


# ---------------------------------------------------------------- diffusion errors


def test_pair_errors_by_hand():
    """2 pairs, outputs of 2 features. Winner rows 0-1, loser rows 2-3; target 0.
    e = mean of squares: row0 (1, 3) -> 5; row1 (0, 2) -> 2; row2 (1, 1) -> 1; row3 (2, 0) -> 2."""
    out = T(1, 3, 0, 2, 1, 1, 2, 0).reshape(4, 2)
    e = pair_errors(out, torch.zeros(4, 2), timesteps=torch.tensor([5, 9, 5, 9]))
    assert_close(e.w, T(5, 2))
    assert_close(e.l, T(1, 2))
    assert_close(e.d, T(4, 0))


def test_pair_errors_says_what_is_wrong():
    with pytest.raises(ValueError, match="differ in shape"):
        pair_errors(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="batch of 2B"):
        pair_errors(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="must share t"):
        pair_errors(torch.zeros(4, 2), torch.zeros(4, 2), timesteps=torch.tensor([1, 2, 1, 3]))


def test_pair_noise_is_shared_within_a_pair():
    lat = torch.zeros(6, 4, 2, 2)
    noise, t = pair_noise(lat, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(noise[:3], noise[3:]) and torch.equal(t[:3], t[3:])
    assert not torch.equal(noise[0], noise[1])


def test_v_prediction_target_matches_the_formula():
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) z (Salimans & Ho), with abar from the scheduler."""
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    z, eps, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 700])
    abar = sch.alphas_cumprod[t].view(2, 1, 1, 1)
    assert_close(training_target("v_prediction", sch, z, eps, t), abar.sqrt() * eps - (1 - abar).sqrt() * z)
    assert training_target("epsilon", sch, z, eps, t) is eps
    with pytest.raises(ValueError, match="prediction_type"):
        training_target("flow", sch, z, eps, t)


# ---------------------------------------------------------------- DPO


def test_dpo_golden():
    """policy e_w = (0.10, 0.30), e_l = (0.20, 0.10) -> d_theta = (-0.10, 0.20)
    ref     e_w = e_l = (0.15, 0.20)              -> d_ref = (0, 0)
    h = d_ref - d_theta = (0.10, -0.20); beta = 10 -> logit = (1, -2)
    loss = (softplus(-1), softplus(2)) = (0.313262, 2.126928); accuracy = (1, 0);
    rewards e_ref - e_theta: winner (0.05, -0.10), loser (-0.05, 0.10)."""
    cfg = ObjectiveConfig(name="dpo", beta=10.0)
    out = build_objective(cfg)(
        ModelErrors(errs((0.10, 0.30), (0.20, 0.10)), errs((0.15, 0.20), (0.15, 0.20)))
    )
    assert_close(out.loss, T(SP_M1, SP_2))
    assert_close(out.stats["h"], T(0.10, -0.20))
    assert_close(out.stats["logit"], T(1.0, -2.0))
    assert_close(out.stats["accuracy"], T(1.0, 0.0))
    assert_close(out.stats["reward_w"], T(0.05, -0.10))
    assert_close(out.stats["reward_l"], T(-0.05, 0.10))


def test_dpo_invariants():
    torch.manual_seed(0)
    pol = PairErrors(torch.rand(8), torch.rand(8))
    ref = PairErrors(torch.rand(8), torch.rand(8))
    # the policy equal to the reference: h = 0, loss = log 2 for any beta; ties count one half
    same = build_objective(ObjectiveConfig(beta=2500.0))(ModelErrors(pol, pol))
    assert_close(same.loss, torch.full((8,), math.log(2.0)))
    assert_close(implicit_accuracy(torch.zeros(3)), torch.full((3,), 0.5))
    # swapping winner and loser negates h (and so the logit)
    h = preference_h(pol, ref)
    assert_close(preference_h(PairErrors(pol.l, pol.w), PairErrors(ref.l, ref.w)), -h)
    # beta only scales the logit: L(h; beta) = L(beta h; 1), and beta 2500 here = beta_dpo 5000 in the
    # official code's -0.5 * beta_dpo * (model_diff - ref_diff)
    assert_close(dpo_loss(h, 2500.0), dpo_loss(2500.0 * h, 1.0))
    official = torch.nn.functional.softplus(0.5 * 5000.0 * (pol.d - ref.d))
    assert_close(dpo_loss(h, 2500.0), official)


# ---------------------------------------------------------------- baselines


def test_baselines_golden():
    """h = (0.1, -0.2, 0.05), beta = 10 -> logit (1, -2, 0.5).
    robust (eps 0.1), logit 1: (0.9 softplus(-1) - 0.1 softplus(1)) / 0.8 = 0.188262
    cdpo   (eps 0.1), logit 1:  0.9 softplus(-1) + 0.1 softplus(1)        = 0.413262
    IPO: (h - 1/(2 beta))^2 = (0.1 - 0.05)^2 = 0.0025; (-0.25)^2 = 0.0625; 0
    hinge: max(0, 1 - logit) = 0, 3, 0.5"""
    h = T(0.1, -0.2, 0.05)
    assert_close(baselines.robust_dpo_loss(h, 10.0, 0.1)[0], torch.tensor(0.1882616875182229))
    assert_close(baselines.conservative_dpo_loss(h, 10.0, 0.1)[0], torch.tensor(0.4132616875182229))
    assert_close(baselines.ipo_loss(h, 10.0), T(0.0025, 0.0625, 0.0))
    assert_close(baselines.hinge_loss(h, 10.0), T(0.0, 3.0, 0.5))
    # eps = 0 turns both back into DPO
    assert_close(baselines.robust_dpo_loss(h, 10.0, 0.0), dpo_loss(h, 10.0))
    assert_close(baselines.conservative_dpo_loss(h, 10.0, 0.0), dpo_loss(h, 10.0))
    with pytest.raises(ValueError, match="eps"):
        baselines.robust_dpo_loss(h, 10.0, 0.5)


def test_sft_needs_no_reference_and_no_losers():
    obj = build_objective(ObjectiveConfig(name="sft"))
    assert not obj.needs_reference and not obj.needs_losers
    out = obj(ModelErrors(errs((0.3, 0.7), (9.0, 9.0))))
    assert_close(out.loss, T(0.3, 0.7))


# ---------------------------------------------------------------- Adaptive-DPO

# Two pairs, M = 2 (policy + one EMA), rho = 10, beta = 10, k1 = 10, k2 = -0.5, c2 = 0.2:
#   pair 1: h_theta = 0.1, h_ema = 0.3 -> g = (1, 3)
#           c = 1 - (sigmoid 1 + sigmoid 3)/2 = 0.158183647;  s = var(1, 3) = 2 (unbiased);  u = 0.316367295
#   pair 2: h_theta = 0.0, h_ema = 0.1 -> g = (0, 1)
#           c = 1 - (0.5 + sigmoid 1)/2 = 0.384470711;  s = var(0, 1) = 0.5;  u = 0.192235355
U = (0.31636729454756174, 0.1922353553424988)
C = (0.15818364727378087, 0.3844707106849976)


def _adaptive_errors():
    """ref d = 0; policy d = -h_theta; EMA d = -h_ema (errors chosen so)."""
    ref = errs((0.5, 0.5), (0.5, 0.5))
    pol = errs((0.4, 0.5), (0.5, 0.5))
    ema = errs((0.2, 0.4), (0.5, 0.5))
    return ModelErrors(pol, ref, [ema])


def _acfg(**kw):
    base = dict(rho=10.0, k1=10.0, k2=-0.5, c2=0.2)
    base.update(kw)
    return ObjectiveConfig(name="adaptive_dpo", beta=10.0, adaptive=AdaptiveConfig(**base))


def test_minority_score_golden():
    hm = T(0.1, 0.0, 0.3, 0.1).reshape(2, 2)  # rows: models, columns: pairs
    ms = adaptive.minority_score(hm, rho=10.0, spread="variance")
    assert_close(ms.c, T(*C))
    assert_close(ms.s, T(2.0, 0.5))
    assert_close(ms.u, T(*U))
    # std capped at 1: pair 1 std sqrt 2 -> 1, pair 2 std sqrt 0.5 = 0.707107
    ms = adaptive.minority_score(hm, rho=10.0, spread="std_clamped")
    assert_close(ms.u, T(C[0] * 1.0, C[1] * math.sqrt(0.5)))
    # normalize: divide by the batch mean of s = (2 + 0.5)/2 = 1.25
    ms = adaptive.minority_score(hm, rho=10.0, spread="variance", normalize=True)
    assert_close(ms.u, T(U[0] / 1.25, U[1] / 1.25))
    with pytest.raises(ValueError, match="M >= 2"):
        adaptive.minority_score(T(0.1, 0.2).reshape(1, 2), rho=10.0)


@pytest.mark.parametrize(
    "kind,expected",
    [  # 1/(1+k1 u) | 1/(1+k1 u^2) | 1/(1+k1 sqrt u) | 1/(1+exp(k1 u)), k1 = 10, u as above
        ("linear", (0.24017256232544212, 0.3421899444124424)),
        ("square", (0.49977943469269054, 0.7301698722255086)),
        ("sqrt", (0.15095128628147267, 0.18571946394812797)),
        ("sigmoid", (0.04055589375102783, 0.12759934433609135)),
    ],
)
def test_weight_variants_golden(kind, expected):
    assert_close(adaptive.weight(T(*U), kind, 10.0), T(*expected))


@pytest.mark.parametrize(
    "kind,expected",
    [  # none 0 | linear k2 u + c2 | quadratic k2 u^2 + c2, k2 = -0.5, c2 = 0.2
        ("none", (0.0, 0.0)),
        ("linear", (0.04181635272621914, 0.10388232232875061)),
        ("quadratic", (0.14995586747032816, 0.18152278407817163)),
    ],
)
def test_margin_variants_golden(kind, expected):
    assert_close(adaptive.margin(T(*U), kind, -0.5, 0.2), T(*expected))


def test_adaptive_dpo_and_ipo_golden():
    """Linear weight, quadratic margin: L = W softplus(-(beta h - G)).
    pair 1: W = 0.240173, G = 0.149956, logit 1   -> 0.240173 softplus(-0.850044) = 0.085466
    pair 2: W = 0.342190, G = 0.181523, logit 0   -> 0.342190 softplus(0.181523)  = 0.269653
    Adaptive-IPO: W (h - G/beta - 1/(2 beta))^2 = 0.000294286, 0.001589381"""
    out = build_objective(_acfg())(_adaptive_errors())
    assert_close(out.loss, T(0.08546585156350729, 0.26965311720397983))
    assert_close(out.stats["u"], T(*U))
    assert_close(out.stats["W"], T(0.24017256232544212, 0.3421899444124424))
    assert_close(out.stats["G"], T(0.14995586747032816, 0.18152278407817163))
    ipo = build_objective(ObjectiveConfig(name="adaptive_ipo", beta=10.0, adaptive=_acfg().adaptive))(
        _adaptive_errors()
    )
    assert_close(ipo.loss, T(0.00029428558948559237, 0.0015893809449349522))


def test_adaptive_defaults_k2_and_c2_follow_the_authors_code():
    """k2 = -1/beta and c2 = mean h_theta = 0.05: pair 1 G = -0.1 u^2 + 0.05."""
    out = build_objective(_acfg(k2=None, c2="batch_mean"))(_adaptive_errors())
    assert_close(out.stats["G"], -0.1 * T(*U) ** 2 + 0.05)
    out = build_objective(_acfg(k2=None, c2="batch_mean_logit"))(_adaptive_errors())
    assert_close(out.stats["G"], -0.1 * T(*U) ** 2 + 0.5)


def test_no_gradient_through_W_and_G():
    """Gradients of Adaptive-DPO w.r.t. the policy errors equal those of the same loss with W and G
    passed in as constants; the EMA errors get no gradient at all."""
    e = _adaptive_errors()
    pol = PairErrors(e.policy.w.clone().requires_grad_(), e.policy.l.clone().requires_grad_())
    ema = PairErrors(e.ema[0].w.clone().requires_grad_(), e.ema[0].l.clone().requires_grad_())
    out = build_objective(_acfg(k2=None, c2="batch_mean"))(ModelErrors(pol, e.ref, [ema]))
    out.loss.sum().backward()
    W, G = out.stats["W"].clone(), out.stats["G"].clone()
    pol2 = PairErrors(e.policy.w.clone().requires_grad_(), e.policy.l.clone().requires_grad_())
    adaptive.adaptive_dpo_loss(preference_h(pol2, e.ref), 10.0, W, G).sum().backward()
    assert_close(pol.w.grad, pol2.w.grad)
    assert_close(pol.l.grad, pol2.l.grad)
    assert ema.w.grad is None and ema.l.grad is None


def test_policy_equal_to_reference_gives_log2_and_W_one():
    """All models equal the reference: h = 0, g = 0, s = 0, u = 0, W = 1, G = c2 = mean h = 0."""
    e = errs((0.3, 0.2), (0.4, 0.1))
    out = build_objective(_acfg(k2=None, c2="batch_mean"))(ModelErrors(e, e, [e, e]))
    assert_close(out.stats["W"], T(1.0, 1.0))
    assert_close(out.loss, torch.full((2,), math.log(2.0)))


def test_warmup_is_plain_dpo_until_the_step_the_objective_is_given():
    """The objective decides from the optimizer step the trainer gives it (``begin_step``): plain DPO, with
    no EMA forward asked for, before objective.adaptive.warmup_steps; the metric from that step on."""
    e = _adaptive_errors()
    obj = build_objective(_acfg(warmup_steps=3))
    assert not obj.ema_active  # a new objective stands at step 0
    for step in (0, 2):
        obj.begin_step(step)
        warm = obj(e)
        assert not obj.ema_active
        assert_close(warm.loss, dpo_loss(preference_h(e.policy, e.ref), 10.0))
        assert torch.isnan(warm.stats["u"]).all() and torch.equal(warm.stats["W"], T(1.0, 1.0))
    obj.begin_step(3)
    assert obj.ema_active
    assert torch.equal(obj(e).loss, build_objective(_acfg())(e).loss)  # as without a warm-up


def test_u_ranks_a_disagreeing_unstable_pair_above_an_agreeing_stable_one():
    """pair A: every model prefers the labelled winner, and they agree (h = 0.30, 0.31, 0.29);
    pair B: the models lean against the label and disagree (h = -0.30, 0.20, -0.05)."""
    hm = T(0.30, -0.30, 0.31, 0.20, 0.29, -0.05).reshape(3, 2)
    for spread in ("variance", "std_clamped"):
        u = adaptive.minority_score(hm, rho=15.0, spread=spread).u
        assert u[1] > u[0], spread
    ms = adaptive.minority_score(hm, rho=15.0)
    assert ms.c[1] > ms.c[0] and ms.s[1] > ms.s[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_low_precision_inputs_with_huge_logits_stay_finite(dtype, name):
    """|logit| = 1e4 (beta 1e4, |h| = 1) from fp16 / bf16 errors: every loss stays finite."""
    pol = PairErrors(torch.tensor([0.0, 2.0], dtype=dtype), torch.tensor([1.0, 1.0], dtype=dtype))
    ref = PairErrors(torch.tensor([1.0, 1.0], dtype=dtype), torch.tensor([1.0, 1.0], dtype=dtype))
    ema = PairErrors(torch.tensor([0.5, 1.5], dtype=dtype), torch.tensor([1.0, 1.0], dtype=dtype))
    cfg = ObjectiveConfig(name=name, beta=1e4, eps=0.1)
    out = build_objective(cfg)(ModelErrors(pol, ref, [ema], {"user_id": torch.tensor([7, 8])}))
    assert torch.isfinite(out.loss).all(), out.loss
    if name not in ("sft",):
        assert_close(out.stats["logit"], T(1e4, -1e4))


# ---------------------------------------------------------------- calibration options and controls (minority study)


def test_bounded_dpo_golden():
    """h = (0.1, -0.2), beta 10, k 1: |logit| = (1, 2) -> W = (1/2, 1/3);
    loss = W softplus(-logit) = (0.5 * 0.313262, 2.126928 / 3) = (0.156631, 0.708976). No EMA needed."""
    cfg = ObjectiveConfig(name="bounded_dpo", beta=10.0, bounded_k=1.0)
    obj = build_objective(cfg)
    assert not obj.uses_ema
    out = obj(ModelErrors(errs((0.10, 0.30), (0.20, 0.10)), errs((0.15, 0.20), (0.15, 0.20))))
    assert_close(out.stats["W"], T(0.5, 1 / 3))
    assert_close(out.loss, T(0.5 * SP_M1, SP_2 / 3))


def test_g_on_the_logit_scale_equals_rho_times_beta():
    hm = T(0.1, 0.0, 0.3, 0.1).reshape(2, 2)
    a = adaptive.minority_score(hm, rho=1.0, g_scale="logit", beta=10.0)
    assert_close(a.u, adaptive.minority_score(hm, rho=10.0).u)


def test_standardized_g_and_score_variants_golden():
    """3 pairs, 2 models. model 0: h = (0.1, 0.0, 0.2), mean 0.1, std 0.1 -> z = (0, -1, 1);
    model 1: h = (0.3, 0.1, 0.2), mean 0.2, std 0.1 -> z = (1, -1, 0). rho 1: g per pair (0,1), (-1,-1), (1,0).
    c = 1 - mean sigmoid(g) = (0.384471, 0.731059, 0.384471); s = var = (0.5, 0, 0.5); u = s c = (0.192235, 0, 0.192235)."""
    hm = T(0.1, 0.0, 0.2, 0.3, 0.1, 0.2).reshape(2, 3)
    c = T(0.3844707106849976, 0.7310585786300049, 0.3844707106849976)
    s = T(0.5, 0.0, 0.5)
    ms = adaptive.minority_score(hm, rho=1.0, g_scale="standardized")
    assert_close(ms.c, c)
    assert_close(ms.s, s)
    assert_close(ms.u, s * c)
    assert_close(adaptive.minority_score(hm, rho=1.0, g_scale="standardized", score="c").u, c)
    assert_close(adaptive.minority_score(hm, rho=1.0, g_scale="standardized", score="s").u, s)


def test_renormalized_weights_have_batch_mean_one():
    """W = (0.2, 0.6) -> / 0.4 = (0.5, 1.5); through the objective, mean W is 1 and the order is kept."""
    assert_close(adaptive.renormalize(T(0.2, 0.6)), T(0.5, 1.5))
    out = build_objective(_acfg(renormalize=True))(_adaptive_errors())
    w = T(0.24017256232544212, 0.3421899444124424)
    assert_close(out.stats["W"], w / w.mean())


def test_ema_half_lives_become_decays():
    from pipeline.schema.train import EMAConfig

    e = EMAConfig(decays=[0.9], half_lives=[10.0])
    assert e.all_decays[0] == 0.9
    assert e.all_decays[1] ** 10 == pytest.approx(0.5)  # after 10 updates the start weighs one half


# ---------------------------------------------------------------- the paper read literally vs the authors' code


def test_spread_of_h_is_eq12_rho_enters_c_only():
    """spread_of="h" (the paper's Eq. 12): s is the sample variance of the unscaled h_m, so it does not
    change with rho; c does. 3 models, 2 pairs:
      pair 1: h = (0.1, 0.2, 0.3)  -> s = ((-0.1)^2 + 0 + 0.1^2) / 2 = 0.01
      pair 2: h = (0.0, -0.1, 0.4) -> mean 0.1, s = (0.01 + 0.04 + 0.09) / 2 = 0.07
    c = mean_m sigmoid(-rho h_m):
      rho 10: pair 1 (s(-1) + s(-2) + s(-3)) / 3 = 0.145190072;  pair 2 (s(0) + s(1) + s(-4)) / 3 = 0.416348263
      rho 20: pair 1 (s(-2) + s(-4) + s(-6)) / 3 = 0.046553918;  pair 2 (s(0) + s(2) + s(-8)) / 3 = 0.460377476
    spread_of="g" (the authors' code) instead: var(rho h) = rho^2 (0.01, 0.07) = (1, 7) at rho 10."""
    hm = T(0.1, 0.0, 0.2, -0.1, 0.3, 0.4).reshape(3, 2)  # rows: models, columns: pairs
    s = T(0.01, 0.07)
    c = {10.0: T(0.14519007218989316, 0.4163482628640321), 20.0: T(0.046553918380281285, 0.4603774760361162)}
    for rho in (10.0, 20.0):
        ms = adaptive.minority_score(hm, rho=rho, spread="variance", spread_of="h")
        assert_close(ms.s, s)
        assert_close(ms.c, c[rho])
        assert_close(ms.u, s * c[rho])
    g = adaptive.minority_score(hm, rho=10.0, spread="variance", spread_of="g")
    assert_close(g.s, T(1.0, 7.0))
    assert_close(g.c, c[10.0])
    # std capped at 1 of h: sqrt(0.01) = 0.1, sqrt(0.07) = 0.264575 (both under the cap)
    std = adaptive.minority_score(hm, rho=10.0, spread="std_clamped", spread_of="h")
    assert_close(std.s, T(0.1, math.sqrt(0.07)))
    # on the logit scale (g = rho beta h) "h" is still the unscaled h: s unchanged, c as rho 10 above
    logit = adaptive.minority_score(hm, rho=2.0, g_scale="logit", beta=5.0, spread_of="h")
    assert_close(logit.s, s)
    assert_close(logit.c, c[10.0])
    with pytest.raises(ValueError, match="spread_of"):
        adaptive.minority_score(hm, rho=10.0, spread_of="x")


def test_spread_of_h_through_the_objective():
    """_adaptive_errors(): h_theta = (0.1, 0.0), h_ema = (0.3, 0.1), rho 10: s = var(h) = (0.02, 0.005),
    c as C above, u = s c = U / 100."""
    out = build_objective(_acfg(spread_of="h"))(_adaptive_errors())
    assert_close(out.stats["s"], T(0.02, 0.005))
    assert_close(out.stats["u"], T(*U) / 100)


def test_adaptive_ipo_margin_on_the_h_scale_golden():
    """ipo_margin="h" (the paper's Appendix E): W (h - G - 1/(2 beta))^2, G as is. W, G as in
    test_adaptive_dpo_and_ipo_golden (beta 10, h = (0.1, 0.0)):
      pair 1: 0.240173 (0.1 - 0.149956 - 0.05)^2 = 0.240173 * 0.099956^2 = 0.002399606
      pair 2: 0.342190 (0.0 - 0.181523 - 0.05)^2 = 0.342190 * 0.231523^2 = 0.018342339
    The default "logit" (G / beta) keeps the values of that test."""
    a = _acfg(ipo_margin="h").adaptive
    out = build_objective(ObjectiveConfig(name="adaptive_ipo", beta=10.0, adaptive=a))(_adaptive_errors())
    assert_close(out.loss, T(0.0023996062064871215, 0.018342338997444505))
    a = _acfg().adaptive
    out = build_objective(ObjectiveConfig(name="adaptive_ipo", beta=10.0, adaptive=a))(_adaptive_errors())
    assert_close(out.loss, T(0.00029428558948559237, 0.0015893809449349522))
    with pytest.raises(ValueError, match="ipo_margin"):
        adaptive.adaptive_ipo_loss(T(0.1), 10.0, T(1.0), T(0.0), "x")


def test_confidence_does_not_underflow_for_large_g():
    """g = 30: c = sigmoid(-30) = 9.3576e-14, which 1 - sigmoid(30) rounds to exactly 0 in float32.
    pair 2: g = (30, 31), c = (sigmoid(-30) + sigmoid(-31)) / 2, s = 0.5, u = s c > 0."""
    hm = T(30.0, 30.0, 30.0, 31.0).reshape(2, 2)
    ms = adaptive.minority_score(hm, rho=1.0)
    want = torch.tensor([math.exp(-30), (math.exp(-30) + math.exp(-31)) / 2], dtype=torch.float64)
    assert (ms.c > 0).all()
    assert ((ms.c.double() - want).abs() / want).max() < 1e-6
    assert ms.u[0] == 0 and ms.u[1] > 0  # pair 1: the models agree exactly, s = 0
    assert abs(ms.u[1].item() / (0.5 * want[1].item()) - 1) < 1e-6
    assert ms.c.dtype == ms.u.dtype == torch.float32


def test_robust_dpo_at_each_annotators_measured_rate(tmp_path):
    """objective.flip_rates: eps per pair from flip_rates.json (user 1: 0.0, user 2: 0.9, user 3: 0.5;
    user 99 absent -> the global 0.2). Rates above 1/2 read the label reversed at 1 - eps (the same
    loss), capped at flip_rates_cap 0.4. Logits 1 for every pair (beta 10, h 0.1):
      user 1:  softplus(-1)                                            = 0.313262
      user 2:  (0.9 softplus(1) - 0.1 softplus(-1)) / 0.8              = 1.438262  (reversed, eps 0.1)
      user 3:  (0.6 softplus(-1) - 0.4 softplus(1)) / 0.2              = -1.686739 (0.5 capped at 0.4)
      user 99: (0.8 softplus(-1) - 0.2 softplus(1)) / 0.6              = -0.020072"""
    from pipeline.errors import UserError

    f = tmp_path / "flip_rates.json"
    rows = [(1, 0.0, 5), (2, 0.9, 5), (3, 0.5, 0)]
    f.write_text(
        json.dumps(
            {
                "global_flip_rate": 0.2,
                "annotators": [{"user_id": u, "flip_rate": r, "informative": n} for u, r, n in rows],
            }
        )
    )
    obj = build_objective(ObjectiveConfig(name="robust_dpo", beta=10.0, flip_rates=str(f)))
    assert obj.batch_fields == ("user_id",)
    ref = PairErrors(torch.zeros(4), torch.zeros(4))
    for sign in (1, -1):  # the policy's errors that give h = +0.1 (logit 1)
        pol = PairErrors(torch.full((4,), -0.05 * sign), torch.full((4,), 0.05 * sign))
        if preference_h(pol, ref)[0] > 0:
            break
    assert_close(preference_h(pol, ref), torch.full((4,), 0.1))
    users = torch.tensor([1, 2, 3, 99])
    out = obj(ModelErrors(pol, ref, fields={"user_id": users}))
    assert_close(
        out.loss, T(0.3132616875182229, 1.4382616875182226, -1.6867383124817772, -0.0200716458151105)
    )
    assert_close(out.stats["eps_pair"], T(0.0, 0.9, 0.5, 0.2))
    # the reversed reading is Robust-DPO's own formula at eps 0.9 (valid for any eps != 1/2)
    x, e = 1.0, 0.9
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731
    assert out.loss[1].item() == pytest.approx(((1 - e) * sp(-x) - e * sp(x)) / (1 - 2 * e), rel=1e-6)
    # a file that measured nothing, a missing file, another objective: refused with the key named
    f.write_text(json.dumps({"global_flip_rate": 0.5, "annotators": [{"user_id": 1, "flip_rate": 0.5}]}))
    with pytest.raises(UserError, match="measures nothing"):
        build_objective(ObjectiveConfig(name="robust_dpo", flip_rates=str(f)))
    with pytest.raises(UserError, match="objective.flip_rates=.*no such file"):
        build_objective(ObjectiveConfig(name="robust_dpo", flip_rates=str(tmp_path / "nope.json")))
    assert "flip_rates" in ObjectiveConfig(name="dpo", flip_rates=str(f)).check()[0]
