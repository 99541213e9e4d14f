"""D3PO's maths, golden-tested (docs/method.md, "D3PO"): the DDIM step at eta = 1 as a
Gaussian transition, its log-density, re-scoring a stored trajectory, the clamped-ratio loss, and the
``d3po`` objective's config. Fast and in-process: the tiny SD1.5 UNet (8x8 latents) at most.

Hand values (beta = 0.1, eps = 0.1), softplus(x) = log(1 + e^x) = -log sigmoid(-x):
    log 1.1 = 0.09531017980432493      log 0.9 = -0.10536051565782628     log(1.1/0.9) = 0.20067069546215124
    softplus(-0.007) = 0.6896533055474401
    softplus(-0.1 log(1.1/0.9)) = 0.683163980852314     softplus(+0.1 log(1.1/0.9)) = 0.7032310503985292
    softplus(-0.1 (log 1.1 - 0.04)) = 0.6903854955848422       log 2 = 0.6931471805599453
    0.1 sigmoid(-0.007) = 0.049825000714579834
"""

from __future__ import annotations

import math
import random
import typing
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.testing import assert_close

from pipeline.config import load_config
from pipeline.d3po import rewards
from pipeline.d3po.ddim import cfg_noise_pred, ddim_mean_std, ddim_step_with_logprob
from pipeline.errors import ConfigError, UserError
from pipeline.losses.d3po import (
    TransitionLogProbs,
    d3po_loss,
    d3po_terms,
    trained_timesteps,
    trajectory_margin,
)
from pipeline.losses.objectives import OBJECTIVES, TRAJECTORY_OBJECTIVES, build_objective
from pipeline.schema.feedback import REWARD_NAMES, SCORER_REWARDS, SCRIPTED_REWARDS
from pipeline.schema.objective import ObjectiveConfig, TrajectoryObjectiveName
from pipeline.schema.train import TrainConfig
from pipeline.train.registry import WORKLOADS
from stages import train

ROOT = Path(__file__).resolve().parents[1]
LOG2 = 0.6931471805599453
LOG11, LOG09 = 0.09531017980432493, -0.10536051565782628


def T(*x):
    return torch.tensor(x, dtype=torch.float32)


def sd_ddim(prediction_type: str = "epsilon", steps: int = 20, **kw) -> DDIMScheduler:
    """SD1.5's schedule (scaled_linear 0.00085..0.012, steps_offset 1, set_alpha_to_one False)."""
    s = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        **kw,
    )
    s.set_timesteps(steps)
    return s


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the DDIM step as a Gaussian


def _hand_mean_std(s: DDIMScheduler, e: torch.Tensor, t: int, x: torch.Tensor, eta: float):
    """docs/method.md's D3PO density written out in float64, epsilon prediction, no clipping."""
    ac = s.alphas_cumprod.double()
    prev = t - s.config.num_train_timesteps // s.num_inference_steps
    a_t = float(ac[t])
    a_p = float(ac[prev]) if prev >= 0 else float(s.final_alpha_cumprod)
    x0 = (x.double() - math.sqrt(1 - a_t) * e.double()) / math.sqrt(a_t)
    std = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mean = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - std**2) * e.double()
    return mean, std


@pytest.mark.parametrize("t_index", [0, 10, 19])  # first, middle and last (a_p = final_alpha_cumprod) step
def test_log_prob_is_the_gaussian_density_averaged_over_elements(t_index):
    s = sd_ddim()
    t = int(s.timesteps[t_index])
    x, e, prev = randn(3, 4, 5, 6, seed=1), randn(3, 4, 5, 6, seed=2), randn(3, 4, 5, 6, seed=3)
    mean, std = _hand_mean_std(s, e, t, x, eta=1.0)
    prev = mean.float() + std * prev  # a plausible x_{t-1}
    _, lp = ddim_step_with_logprob(s, e, t, x, eta=1.0, prev_sample=prev)
    want = torch.distributions.Normal(mean, std).log_prob(prev.double()).mean(dim=(1, 2, 3))
    assert lp.shape == (3,) and lp.dtype == torch.float32
    assert_close(lp, want.float(), rtol=1e-5, atol=1e-5)
    # one element by hand with math, the mean over elements by hand too
    m, v = mean[0].flatten().tolist(), prev[0].double().flatten().tolist()
    dens = [
        -((a - b) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
        for a, b in zip(v, m)
    ]
    assert lp[0].item() == pytest.approx(sum(dens) / len(dens), rel=1e-5, abs=1e-5)
    # mean and std themselves
    mean2, std2 = ddim_mean_std(s, e, t, x, eta=1.0)
    assert_close(mean2, mean.float(), rtol=1e-5, atol=1e-5)
    # float32, as diffusers: 1 - a_t / a_p cancels at the last step (a_t ~ a_p ~ 0.999), rel. error ~1e-5
    assert std2.flatten().item() == pytest.approx(std, rel=1e-4)


def test_sampled_log_prob_depends_only_on_the_noise_and_std():
    """x_{t-1} = mean + std z  =>  log p = mean(-z^2 / 2) - log std - log sqrt(2 pi), whatever the model."""
    s = sd_ddim()
    t = int(s.timesteps[5])
    z = randn(2, 4, 8, 8, seed=4)
    _, std = ddim_mean_std(s, randn(2, 4, 8, 8), t, randn(2, 4, 8, 8, seed=9))
    _, lp = ddim_step_with_logprob(s, randn(2, 4, 8, 8), t, randn(2, 4, 8, 8, seed=9), noise=z)
    want = (-(z.double() ** 2) / 2).mean(dim=(1, 2, 3)) - math.log(std.item()) - 0.5 * math.log(2 * math.pi)
    assert_close(lp, want.float(), rtol=1e-5, atol=1e-5)


def test_per_sample_timesteps_and_eta_scale_the_std():
    s = sd_ddim()
    ts = s.timesteps[[0, 7, 19]]
    x, e, z = randn(3, 4, 4, 4, seed=1), randn(3, 4, 4, 4, seed=2), randn(3, 4, 4, 4, seed=3)
    prev, lp = ddim_step_with_logprob(s, e, ts, x, noise=z)
    for i in range(3):  # batched timesteps == one call per sample
        p1, l1 = ddim_step_with_logprob(s, e[i : i + 1], int(ts[i]), x[i : i + 1], noise=z[i : i + 1])
        assert_close(prev[i : i + 1], p1)
        assert_close(lp[i : i + 1], l1)
    _, std1 = ddim_mean_std(s, e, ts, x, eta=1.0)
    _, std5 = ddim_mean_std(s, e, ts, x, eta=0.5)
    assert_close(std5, 0.5 * std1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prev_sample_equals_diffusers_ddim_step(prediction_type):
    """Same noise -> the same x_{t-1} as DDIMScheduler.step(eta=1, variance_noise=noise), every step."""
    s = sd_ddim(prediction_type)
    x, out, z = randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2), randn(2, 4, 8, 8, seed=3)
    for t in s.timesteps:
        want = s.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        got, _ = ddim_step_with_logprob(s, out, t, x, eta=1.0, noise=z)
        assert_close(got, want, rtol=0, atol=0)
    # a generator draws the noise diffusers draws
    want = s.step(out, s.timesteps[3], x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    got, _ = ddim_step_with_logprob(s, out, s.timesteps[3], x, generator=torch.Generator().manual_seed(7))
    assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("option", [{"clip_sample": True, "clip_sample_range": 0.5}, {"thresholding": True}])
def test_clipping_and_thresholding_follow_diffusers(option):
    s = DDIMScheduler.from_config(sd_ddim().config, **option)
    s.set_timesteps(20)
    x, out, z = 3 * randn(2, 4, 8, 8, seed=1), 3 * randn(2, 4, 8, 8, seed=2), randn(2, 4, 8, 8, seed=3)
    for t in s.timesteps[[0, 10, 19]]:
        want = s.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        got, _ = ddim_step_with_logprob(s, out, t, x, noise=z)
        assert_close(got, want, rtol=0, atol=0)


def test_refusals_say_what_is_wrong():
    s = sd_ddim()
    x = randn(1, 4, 4, 4)
    t = int(s.timesteps[0])
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(s, x, t, x, eta=0.0)
    with pytest.raises(ValueError, match="not both"):
        ddim_step_with_logprob(s, x, t, x, prev_sample=x, noise=x)
    with pytest.raises(ValueError, match="differ in shape"):  # e.g. the [uncond; cond] output uncombined
        ddim_step_with_logprob(s, torch.cat([x, x]), t, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler(), x, t, x)
    with pytest.raises(TypeError, match="DDIMScheduler"):
        from diffusers import DDPMScheduler

        ddim_step_with_logprob(DDPMScheduler(), x, t, x)
    # set_alpha_to_one=True: the last step has zero variance, hence no density; earlier steps are fine
    one = DDIMScheduler.from_config(s.config, set_alpha_to_one=True)
    one.set_timesteps(20)
    ddim_step_with_logprob(one, x, int(one.timesteps[0]), x)
    with pytest.raises(ValueError, match="zero variance.*set_alpha_to_one=False"):
        ddim_step_with_logprob(one, x, int(one.timesteps[-1]), x)


def test_fp16_latents_rescore_to_exactly_the_sampled_log_prob():
    """The sampled x_{t-1} is rounded to the latents' dtype before it is scored, so the trainer, which
    only has the rounded one, recomputes exactly the recorded log-prob (the authors' code scores the
    unrounded value)."""
    s = sd_ddim()
    x, out = randn(2, 4, 8, 8, seed=1).to(torch.bfloat16), randn(2, 4, 8, 8, seed=2).to(torch.bfloat16)
    t = int(s.timesteps[-1])  # the smallest std: rounding matters most
    prev, lp = ddim_step_with_logprob(s, out, t, x, noise=randn(2, 4, 8, 8, seed=3))
    assert prev.dtype == torch.bfloat16 and lp.dtype == torch.float32
    _, again = ddim_step_with_logprob(s, out, t, x, prev_sample=prev)
    assert torch.equal(again, lp)


# ---------------------------------------------------------------- the tiny UNet: sampler == trainer


@pytest.fixture(scope="module")
def unet(tiny_sd15):
    m = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").eval()
    m.requires_grad_(False)
    return m


def _text(b, seed):
    return randn(b, 6, 32, seed=seed)  # cross_attention_dim 32 (tools/make_tiny_model.py TEXT_DIM)


def test_cfg_noise_pred_is_guidance_over_one_batched_forward(unet):
    x, text, uncond = randn(2, 4, 8, 8), _text(2, 1), _text(1, 2)
    with torch.no_grad():
        c = unet(x, 500, encoder_hidden_states=text).sample
        u = unet(x, 500, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        got = cfg_noise_pred(unet, x, torch.tensor(500), text, uncond, 5.0)
        assert_close(got, u + 5.0 * (c - u), rtol=1e-5, atol=1e-5)
        assert torch.equal(cfg_noise_pred(unet, x, 500, text, None, 1.0), c)  # guidance 1: cond only
    with pytest.raises(ValueError, match="uncond"):
        cfg_noise_pred(unet, x, 500, text, None, 5.0)


def _sample(unet, s, x, text, uncond, seed):
    """The sampler: every latent, every log-prob (the trajectory D3PO stores)."""
    g = torch.Generator().manual_seed(seed)
    lats, lps = [x], []
    with torch.no_grad():
        for t in s.timesteps:
            e = cfg_noise_pred(unet, lats[-1], t, text, uncond, 5.0)
            nxt, lp = ddim_step_with_logprob(s, e, t, lats[-1], eta=1.0, generator=g)
            lats.append(nxt)
            lps.append(lp)
    return lats, lps


def test_unchanged_policy_rescores_stored_transitions_exactly_ratio_one_loss_log2(unet):
    """Two images of one prompt from the same initial noise (D3PO's sampling). Re-scoring each stored
    transition under the same UNet (steps in shuffled order, as the trainer does) gives the recorded
    log-prob exactly, so every ratio is exactly 1, h = 0 and the loss is log 2; the gradient at ratio 1
    is not zero (the clamp is open), so training starts from the first step."""
    s = sd_ddim(steps=4)
    x = randn(1, 4, 8, 8, seed=5).repeat(2, 1, 1, 1)
    text, uncond = _text(1, 1).repeat(2, 1, 1), _text(1, 2)
    lats, lps = _sample(unet, s, x, text, uncond, seed=11)
    assert not torch.equal(lats[-1][0], lats[-1][1])  # the same start, two trajectories
    order = list(range(len(s.timesteps)))
    random.Random(0).shuffle(order)
    policy = UNet2DConditionModel.from_config(unet.config)
    policy.load_state_dict(unet.state_dict())
    policy.train()  # no dropout in this UNet: train mode computes the same function
    for j in order:
        t = s.timesteps[j]
        with torch.no_grad():
            _, ref = ddim_step_with_logprob(
                s, cfg_noise_pred(unet, lats[j], t, text, uncond, 5.0), t, lats[j], prev_sample=lats[j + 1]
            )
        _, pol = ddim_step_with_logprob(
            s, cfg_noise_pred(policy, lats[j], t, text, uncond, 5.0), t, lats[j], prev_sample=lats[j + 1]
        )
        assert torch.equal(ref, lps[j]) and torch.equal(pol.detach(), lps[j]), j
        logps = TransitionLogProbs(pol[:1], ref[:1], pol[1:], ref[1:])  # image 0 preferred
        terms = d3po_terms(logps, beta=0.1, eps=0.1)
        assert terms.log_ratio_w.item() == 0.0 and terms.log_ratio_l.item() == 0.0
        assert_close(terms.loss, T(LOG2), rtol=0, atol=1e-7)
        policy.zero_grad()
        terms.loss.sum().backward()
        grads = [p.grad for p in policy.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0, j
    # one trajectory at a time (another batch shape): the same up to float rounding
    j = order[0]
    t = s.timesteps[j]
    with torch.no_grad():
        e1 = cfg_noise_pred(unet, lats[j][1:], t, text[1:], uncond, 5.0)
        _, one = ddim_step_with_logprob(s, e1, t, lats[j][1:], prev_sample=lats[j + 1][1:])
    assert_close(one, lps[j][1:], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the loss


def official_d3po_loss(lp0, ref0, lp1, ref1, prefer0, prefer1, beta=0.1, eps=0.1):
    """yk7333/D3PO scripts/train.py, per pair (their .mean() left to the caller): human_prefer is +1 for
    the preferred sample, -1 for the other, 0 for both on a tie."""
    ratio_0 = torch.clamp(torch.exp(lp0 - ref0), 1 - eps, 1 + eps)
    ratio_1 = torch.clamp(torch.exp(lp1 - ref1), 1 - eps, 1 + eps)
    return -torch.log(
        torch.sigmoid(beta * torch.log(ratio_0) * prefer0 + beta * torch.log(ratio_1) * prefer1)
    )


def _lp(pw, rw, pl, rl, tie=None):
    return TransitionLogProbs(
        T(*pw).requires_grad_(),
        T(*rw),
        T(*pl).requires_grad_(),
        T(*rl),
        None if tie is None else torch.tensor(tie),
    )


def test_d3po_loss_golden_with_both_clamp_sides_and_a_tie():
    """Pairs: (a) both ratios inside the band: h = 0.05 + 0.02; (b) w above 1 + eps, l below 1 - eps;
    (c) the reverse; (d) w clamped high, l inside (0.04); (e) pair (a) as a tie."""
    lp = _lp(
        (0.05, 1.0, -0.5, 0.5, 0.05),
        (0.0, 0.0, 0.0, 0.0, 0.0),
        (0.0, -1.0, 0.3, 0.04, 0.0),
        (0.02, 0.0, 0.0, 0.0, 0.02),
        tie=[False, False, False, False, True],
    )
    terms = d3po_terms(lp, beta=0.1, eps=0.1)
    assert_close(
        terms.loss, T(0.6896533055474401, 0.683163980852314, 0.7032310503985292, 0.6903854955848422, LOG2)
    )
    assert_close(
        terms.logit, T(0.007, 0.1 * 0.20067069546215124, -0.1 * 0.20067069546215124, 0.1 * (LOG11 - 0.04), 0)
    )
    assert_close(d3po_loss(lp), terms.loss)  # defaults beta = eps = 0.1
    terms.loss.sum().backward()
    g = 0.049825000714579834  # beta * sigmoid(-logit) for pair (a)
    # clamped side: no gradient; inside: -+ beta sigmoid(-logit); ties: none at all
    assert_close(lp.policy_w.grad[[0, 1, 2, 3, 4]], T(-g, 0, 0, 0, 0))
    assert lp.policy_l.grad[1] == 0 and lp.policy_l.grad[2] == 0 and lp.policy_l.grad[4] == 0
    assert lp.policy_l.grad[0].item() == pytest.approx(g, rel=1e-6)
    assert lp.policy_l.grad[3].item() > 0  # l inside the band still trains when w is clamped


def test_d3po_loss_equals_the_official_formula_values_and_gradients():
    """Random log-ratios across both clamp sides, either sample preferred, some ties."""
    gen = torch.Generator().manual_seed(0)
    n = 64
    lp0, lp1 = (
        (0.3 * torch.randn(n, generator=gen)).requires_grad_(),
        (0.3 * torch.randn(n, generator=gen)).requires_grad_(),
    )
    ref0, ref1 = 0.1 * torch.randn(n, generator=gen), 0.1 * torch.randn(n, generator=gen)
    score0, score1 = torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 3, (n,), generator=gen)
    prefer0 = (score0 > score1).int() * 2 - 1
    prefer1 = (score1 > score0).int() * 2 - 1
    tie = score0 == score1
    prefer0[tie], prefer1[tie] = 0, 0
    want = official_d3po_loss(lp0, ref0, lp1, ref1, prefer0, prefer1)
    gw0, gw1 = torch.autograd.grad(want.sum(), [lp0, lp1])
    # ours: w = the preferred sample (sample 0 on a tie: the order does not matter there)
    first = score0 >= score1
    pick = lambda a, b: torch.where(first, a, b)  # noqa: E731
    ours = d3po_loss(
        TransitionLogProbs(pick(lp0, lp1), pick(ref0, ref1), pick(lp1, lp0), pick(ref1, ref0), tie)
    )
    g0, g1 = torch.autograd.grad(ours.sum(), [lp0, lp1])
    assert 0 < tie.sum() < n and ((lp0 - ref0).abs() > LOG11).any()
    assert_close(ours, want)
    assert_close(g0, gw0)
    assert_close(g1, gw1)


def test_a_huge_log_ratio_gives_a_zero_not_a_nan_gradient():
    """exp(1000) overflows: the authors' clamp(exp(.)) then back-propagates 0 * inf = nan; the clamp in
    log space gives the same value and a clean zero."""
    lp = _lp((1000.0,), (0.0,), (0.0,), (0.0,))
    loss = d3po_loss(lp)
    loss.backward()
    assert torch.isfinite(loss).all() and lp.policy_w.grad.item() == 0.0
    x = torch.tensor([1000.0], requires_grad=True)
    official_d3po_loss(x, T(0), T(0), T(0), 1, -1).backward()
    assert torch.isnan(x.grad).all()


def test_d3po_stats():
    lp = _lp(
        (0.05, 1.0, 0.0, 0.0),
        (0, 0, 0, 0),
        (0.0, -1.0, 0.3, 0.0),
        (0.02, 0, 0, 0),
        tie=[False, False, False, True],
    )
    obj = build_objective(ObjectiveConfig(name="d3po"))
    st = obj(lp).stats
    assert_close(st["h"], T(0.07, 2.0, -0.3, 0.0))  # unclamped margins
    assert_close(st["log_ratio_w"], T(0.05, 1.0, 0.0, 0.0))
    assert_close(st["clip_frac"], T(0.0, 1.0, 0.5, 0.0))
    assert st["accuracy"][:3].tolist() == [1.0, 1.0, 0.0] and math.isnan(st["accuracy"][3])
    assert st["tie"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert all(not v.requires_grad and v.shape == (4,) for v in st.values())
    with pytest.raises(TypeError, match="TransitionLogProbs"):
        obj(object())


def test_trained_timesteps():
    assert [trained_timesteps(20, f) for f in (1.0, 0.5, 0.01)] == [20, 10, 1]
    assert trained_timesteps(50, 0.58) == 29  # 50 * 0.58 == 28.999... in floating point
    with pytest.raises(ValueError, match="timestep_fraction"):
        trained_timesteps(20, 0.0)


# ---------------------------------------------------------------- the objective and its config

BASE = ["data.shards=s", "output.dir=o", "objective.name=d3po"]


def test_d3po_objective_reads_its_own_config_section():
    cfg = load_config(
        TrainConfig,
        None,
        [*BASE, "objective.d3po.beta=0.5", "objective.d3po.eps=0.2", "objective.d3po.timestep_fraction=0.5"],
    )
    obj = build_objective(cfg.objective)
    assert obj.data_kind == "trajectories" and obj.needs_reference and not obj.uses_ema
    assert (obj.beta, obj.eps, obj.timestep_fraction) == (0.5, 0.2, 0.5)
    lp = _lp((0.15,), (0.0,), (0.0,), (0.0,))  # inside eps = 0.2, clamped at eps = 0.1
    assert_close(obj(lp).loss, T(math.log1p(math.exp(-0.5 * 0.15))))
    assert_close(
        build_objective(ObjectiveConfig(name="d3po"))(lp).loss, T(math.log1p(math.exp(-0.1 * LOG11)))
    )
    # defaults: the authors' train.beta, train.eps, train.timestep_fraction
    d = load_config(TrainConfig, None, BASE).objective.d3po
    assert (d.beta, d.eps, d.timestep_fraction) == (0.1, 0.1, 1.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objective.d3po.eps=-0.1", "objective.d3po.eps: must be in (0, 1), got -0.1"),
        ("objective.d3po.eps=0", "objective.d3po.eps: must be in (0, 1), got 0"),
        ("objective.d3po.eps=1", "objective.d3po.eps: must be in (0, 1), got 1"),
        ("objective.d3po.beta=0", "objective.d3po.beta: must be > 0, got 0"),
        ("objective.d3po.beta=-0.1", "objective.d3po.beta: must be > 0, got -0.1"),
        ("objective.d3po.timestep_fraction=0", "objective.d3po.timestep_fraction: must be in (0, 1], got 0"),
        (
            "objective.d3po.timestep_fraction=1.5",
            "objective.d3po.timestep_fraction: must be in (0, 1], got 1.5",
        ),
    ],
)
def test_bad_d3po_values_are_refused_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, [*BASE, override])
    assert e.value.errors == [message]


def test_d3po_on_pair_shards_is_a_clear_user_error_before_any_model_loads(tmp_path, capsys):
    missing = tmp_path / "missing"
    args = [
        "--config",
        str(ROOT / "configs/train/tiny_dpo.yaml"),
        f"model.path={missing}",
        f"data.shards={missing}",
        f"output.dir={tmp_path / 'out'}",
        "objective.name=d3po",
    ]
    rc = train.cli_main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "objective.name=d3po trains on 'trajectories' data" in err, err
    assert not (tmp_path / "out").exists()


def test_d3po_is_registered_as_a_trajectory_objective_and_documented():
    """Pair objectives take ModelErrors (OBJECTIVES, the names of ObjectiveName); d3po takes
    TransitionLogProbs and sits apart, so nothing feeds it pair errors."""
    names = typing.get_args(TrajectoryObjectiveName)
    assert set(TRAJECTORY_OBJECTIVES) == set(names) == {"d3po", "adaptive_d3po"}
    assert not set(names) & set(OBJECTIVES)
    assert all(c.data_kind == "pairs" for c in OBJECTIVES.values())
    # every objective has its workload (the trainer looks it up by data_kind)
    assert {c.data_kind for c in [*OBJECTIVES.values(), *TRAJECTORY_OBJECTIVES.values()]} <= set(WORKLOADS)
    readme = (ROOT / "README.md").read_text()
    for name in names:
        assert f"| `{name}` |" in readme, name


# ---------------------------------------------------------------- Adaptive-D3PO


def test_trajectory_margin_is_the_whole_trajectorys_log_ratio_winner_minus_loser():
    sums = T(-3.0, -5.0, -2.0, -1.0).view(2, 2)  # [B=2, images i, j]: summed log-densities of a model
    ref = T(-4.0, -4.5, -2.5, -1.0).view(2, 2)
    # pair 0: winner i: (-3 + 4) - (-5 + 4.5) = 1.5; pair 1: winner j: (-1 + 1) - (-2 + 2.5) = -0.5
    assert_close(trajectory_margin(sums, ref, torch.tensor([True, False])), T(1.5, -0.5))


def test_adaptive_d3po_is_weighted_d3po_by_the_minority_score_of_trajectory_margins():
    """Hand-computed: g standardized over the batch (rho 1), u = s c over the policy + 2 EMA models,
    W = 1 / (1 + k1 u) renormalised to mean 1, no margin; the loss is W times D3PO's. Warm-up (before
    objective.adaptive.warmup_steps, the step given by ``begin_step``) or no margins: exactly D3PO, W = 1."""
    cfg = load_config(
        TrainConfig,
        None,
        [
            "data.shards=s",
            "output.dir=o",
            "objective.name=adaptive_d3po",
            "objective.adaptive.g_scale=standardized",
            "objective.adaptive.rho=1",
            "objective.adaptive.margin=none",
            "objective.adaptive.renormalize=true",
            "objective.adaptive.warmup_steps=2",
            "ema.half_lives=[8,1]",
        ],
    )
    obj = build_objective(cfg.objective)
    assert obj.uses_ema and obj.data_kind == "trajectories"
    obj.begin_step(2)
    assert obj.ema_active
    pw, rw, pl, rl = (0.05, -0.2, 0.01), (0.0, 0.0, 0.0), (-0.02, 0.3, 0.0), (0.0, 0.0, 0.0)
    h_models = torch.tensor([[2.0, -1.0, 0.5], [1.0, -2.0, 0.5], [0.0, 0.0, 1.0]])  # [M=3, B=3]
    lp = _lp(pw, rw, pl, rl)
    lp.h_models = h_models
    out = obj(lp)
    z = (h_models - h_models.mean(1, keepdim=True)) / h_models.std(1, keepdim=True)
    c = 1 - torch.sigmoid(z).mean(0)
    u = z.var(0) * c
    W = 1 / (1 + 10 * u)
    W = W / W.mean()
    plain = d3po_loss(_lp(pw, rw, pl, rl))
    assert_close(out.stats["u"], u)
    assert_close(out.stats["W"], W)
    assert_close(out.loss, W * plain)
    assert_close(out.stats["h_traj"], h_models[0])
    out.loss.sum().backward()  # the gradient flows through the policy's log-probs only
    assert lp.policy_w.grad is not None and not h_models.requires_grad
    for step, hm in ((1, h_models), (2, None)):
        obj.begin_step(step)
        assert obj.ema_active == (step >= 2)
        lp2 = _lp(pw, rw, pl, rl)
        lp2.h_models = hm
        o = obj(lp2)
        assert_close(o.loss, plain) and torch.equal(o.stats["W"], torch.ones(3))
        assert torch.isnan(o.stats["u"]).all()


def test_adaptive_d3po_needs_ema_models():
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, ["data.shards=s", "output.dir=o", "objective.name=adaptive_d3po"])
    assert "ema.decays: the adaptive objectives need at least one EMA model" in e.value.errors[0]


# ---------------------------------------------------------------- the feedback's reward names


def test_the_configs_reward_names_are_the_reward_registrys():
    """The feedback config (pipeline/schema/feedback.py) accepts exactly what make_reward makes: every
    scripted reward is a function of pipeline.d3po.rewards, every scorer reward asks for its folder, each
    name has its negation, and any other name is refused."""
    assert set(REWARD_NAMES) == {*SCRIPTED_REWARDS, *SCORER_REWARDS} | {
        f"-{n}" for n in SCRIPTED_REWARDS + SCORER_REWARDS
    }
    for name in REWARD_NAMES:
        base = name.lstrip("-")
        if base in SCRIPTED_REWARDS:
            assert callable(getattr(rewards, base))
            assert rewards.make_reward(name).name == name
        else:
            with pytest.raises(UserError, match=f"give scorers.{base}=FOLDER"):
                rewards.make_reward(name)
    with pytest.raises(UserError, match="unknown"):
        rewards.make_reward("sharpness")
