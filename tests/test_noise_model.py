"""EM-DPO (pipeline/losses/noise_model.py): the loss and posterior against hand computations, its
gradient against the marginal likelihood's, EM recovering flip rates on synthetic margins, the state
through a checkpoint file, and in the trainer: 2 ranks, killed and resumed, equal to an uninterrupted run."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.losses.baselines import conservative_dpo_loss, robust_dpo_loss
from pipeline.losses.diffusion import PairErrors
from pipeline.losses.noise_model import (
    TAU_RANGE,
    FlipRateEstimator,
    fit_flip_rates,
    fit_temperature,
    posterior_flip,
    sigmoid,
)
from pipeline.losses.objectives import ModelErrors, build_objective
from pipeline.metrics_log import read_metrics
from pipeline.minority import auroc
from pipeline.schema.objective import NoiseConfig, ObjectiveConfig
from tests.helpers.run import check, train


def test_posterior_and_loss_by_hand():
    """The posterior loss is conservative DPO's label smoothing with a per-pair q (a tensor)."""
    # eps 0.2, P(label right) 0.9: q = 0.2 * 0.1 / (0.2 * 0.1 + 0.8 * 0.9) = 0.02 / 0.74
    assert posterior_flip(np.array([0.9]), 0.2)[0] == pytest.approx(0.02 / 0.74, rel=1e-12)
    # beta h = 2, q = 0.25: 0.75 log(1 + e^-2) + 0.25 log(1 + e^2)
    want = 0.75 * math.log1p(math.exp(-2)) + 0.25 * math.log1p(math.exp(2))
    got = conservative_dpo_loss(torch.tensor([0.002]), 1000.0, torch.tensor([0.25]))
    assert got.item() == pytest.approx(want, rel=1e-6)
    # q = 0 is DPO
    assert conservative_dpo_loss(torch.tensor([0.002]), 1000.0, torch.tensor([0.0])).item() == pytest.approx(
        math.log1p(math.exp(-2)), rel=1e-6
    )


@pytest.mark.parametrize("eps", [0.05, 0.3, 0.8])
def test_gradient_equals_the_marginal_likelihoods(eps):
    """With the posterior taken at the current margin (tau 1), the EM surrogate's gradient is the
    gradient of -log((1 - eps) sig(z) + eps sig(-z)), the noisy label's likelihood."""
    h = torch.tensor([-0.008, -0.0005, 0.0, 0.001, 0.006], dtype=torch.float64, requires_grad=True)
    beta = 1000.0
    q = posterior_flip(torch.sigmoid(beta * h.detach()), eps)
    (g_em,) = torch.autograd.grad(conservative_dpo_loss(h, beta, q).sum(), h)
    z = beta * h
    marginal = -torch.log((1 - eps) * torch.sigmoid(z) + eps * torch.sigmoid(-z))
    (g_m,) = torch.autograd.grad(marginal.sum(), h)
    torch.testing.assert_close(g_em.double(), g_m, rtol=1e-5, atol=1e-9)
    # a confidently contradicted pair stops pulling towards its label (DPO's weight there is ~1)
    if eps < 0.5:
        assert abs(g_em[0].item()) < 0.05 * beta


def _world(rng, n=4000, users=200, rate=0.3, by="pair"):
    """Latent utility d, truth sign(d); the policy's margin 20 (d + noise) points at the truth with
    accuracy ~0.8; labels flipped per pair or per annotator."""
    user = rng.integers(users, size=n) + 1000
    d = rng.normal(size=n)
    z_true = 20 * (d + rng.normal(0, 0.7, n)) * np.sign(d)  # margin towards the true label
    bad = rng.random(users) < rate
    flipped = rng.random(n) < rate if by == "pair" else bad[user - 1000]
    return np.where(flipped, -z_true, z_true), user, flipped, bad


def _feed(est, z, user, batch=16):
    for i in range(0, len(z), batch):
        est.observe(z[i : i + batch], user[i : i + batch])


def test_em_estimates_the_global_rate_and_finds_flipped_annotators():
    rng = np.random.default_rng(0)
    z, user, flipped, _ = _world(rng, by="pair")
    est = FlipRateEstimator(NoiseConfig(warmup_pairs=0))
    _feed(est, z, user)
    assert abs(est.rate - flipped.mean()) < 0.05, (est.rate, flipped.mean())
    z, user, flipped, bad = _world(rng, by="user")
    est = FlipRateEstimator(NoiseConfig(warmup_pairs=0))
    _feed(est, z, user)
    flipped_user = bad[est.users - 1000]
    assert auroc(est.user_rate, flipped_user) > 0.99
    assert (
        np.median(est.user_rate[flipped_user]) > 0.5 > np.median(est.user_rate[~flipped_user])
    )  # read reversed
    q = posterior_flip(est.p, est.user_rate[est.user_idx])
    assert auroc(q, flipped) > 0.85
    # global only: no per-annotator rates, and the pair ranking falls to the margin's
    g = FlipRateEstimator(NoiseConfig(warmup_pairs=0, per_annotator=False))
    _feed(g, z, user)
    assert np.all(g.rates_for(user[:5]) == g.rate)


def test_fitted_after_training_the_rates_rank_flipped_annotators_and_shrink_the_few_label_ones():
    """fit_flip_rates (the report's audit for any objective): heavy-tailed label counts, 30 % of the
    annotators wholly flipped. The global rate is the flipped share; annotators with many labels get
    rates beyond 1/2 (flipped) or near 0; one with a single label stays near the global rate, whichever
    way it labelled, instead of 0 or 1."""
    rng = np.random.default_rng(3)
    n_users, n = 200, 4000
    share = np.exp(1.5 * rng.standard_normal(n_users))
    user = rng.choice(n_users, size=n, p=share / share.sum()) + 1000
    d = rng.normal(size=n)
    z_true = 20 * (d + rng.normal(0, 0.7, n)) * np.sign(d)
    bad = rng.random(n_users) < 0.3
    z = np.where(bad[user - 1000], -z_true, z_true)
    fit = fit_flip_rates(z, user)
    assert abs(fit["rate"] - bad[user - 1000].mean()) < 0.05
    truth, labels, rate = bad[fit["users"] - 1000], fit["pairs"], fit["user_rate"]
    busy = labels >= 20
    assert rate[busy & ~truth].max() < 0.3 and rate[busy & truth].min() > 0.5
    one = labels == 1
    assert one.any() and np.all(np.abs(rate[one] - fit["rate"]) < 0.25)
    assert auroc(rate, truth) > 0.9
    # the mean margin per annotator ranks a one-label annotator as surely as a busy one: worse
    mean_z = np.array([-z[user == u].mean() for u in fit["users"]])
    assert auroc(rate, truth) >= auroc(mean_z, truth)
    # non-finite margins are left out; prior_pairs = 0 gives the raw posterior means
    raw = fit_flip_rates(np.append(z, np.nan), np.append(user, 1000), prior_pairs=0)
    assert np.all(raw["pairs"] == labels) and np.abs(raw["user_rate"][one] - 0.5).min() > 0.3


def test_uninformative_margins_move_no_rate():
    est = FlipRateEstimator(NoiseConfig(warmup_pairs=0, init_rate=0.17))
    _feed(est, np.zeros(640), np.arange(640) % 7)
    assert est.rate == pytest.approx(0.17) and np.allclose(est.user_rate, 0.17)


def test_temperature_recovers_a_logistic_slope_and_stays_at_most_one():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 10, 20000)
    right = rng.random(len(z)) < sigmoid(0.4 * z)
    z_obs = np.where(right, z, -z)  # margin towards the observed label
    assert fit_temperature(z_obs, np.zeros(len(z))) == pytest.approx(0.4, rel=0.1)
    # labels that follow the margin's sign exactly would want tau -> infinity: capped at 1, so q is never
    # sharper than the loss's own logit (EM would otherwise read every disagreement as a flip)
    assert fit_temperature(np.abs(z), np.full(len(z), 0.3)) == pytest.approx(TAU_RANGE[1], rel=1e-3)


def test_state_survives_a_checkpoint_file(tmp_path):
    rng = np.random.default_rng(2)
    z, user, _, _ = _world(rng, n=640, users=20, by="user")
    cfg = NoiseConfig(warmup_pairs=64, calib_window=128)
    a, b = FlipRateEstimator(cfg), FlipRateEstimator(cfg)
    _feed(a, z, user)
    _feed(b, z[:320], user[:320])
    save_file(b.state_dict(), str(tmp_path / "objective.safetensors"))
    c = FlipRateEstimator(cfg)
    c.load_state_dict(load_file(str(tmp_path / "objective.safetensors")))
    _feed(c, z[320:], user[320:])
    for k, v in a.state_dict().items():
        torch.testing.assert_close(c.state_dict()[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="em_dpo state: expected tensors"):
        c.load_state_dict({"count": torch.zeros(1)})


def _errors(h: torch.Tensor, users: list[int]) -> ModelErrors:
    zero = torch.zeros_like(h)
    return ModelErrors(
        policy=PairErrors(w=zero, l=h),
        ref=PairErrors(w=zero, l=zero),
        fields={"user_id": torch.tensor(users)},
    )


def test_objective_is_dpo_during_warmup_then_robust_dpo_at_the_estimated_rate():
    obj = build_objective(ObjectiveConfig(name="em_dpo", noise=NoiseConfig(warmup_pairs=4)))
    h = torch.tensor([0.003, -0.004])
    torch.testing.assert_close(obj(_errors(h, [1, 2])).loss, torch.nn.functional.softplus(-1000 * h))  # DPO
    obj.observe({"logit": np.array([3.0, -4.0, 2.0, 5.0]), "user_id": np.array([1, 2, 1, 1])})
    assert obj.noise.active and 0 < obj.noise.rate < 0.5
    torch.testing.assert_close(obj(_errors(h, [1, 2])).loss, robust_dpo_loss(h, 1000.0, obj.noise.rate))


def test_posterior_loss_is_dpo_during_warmup_then_weighs_by_the_posterior():
    obj = build_objective(ObjectiveConfig(name="em_dpo", noise=NoiseConfig(warmup_pairs=4, loss="posterior")))
    h = torch.tensor([0.003, -0.004])  # policy prefers the labelled winner, then the loser
    out = obj(_errors(h, [1, 2]))
    torch.testing.assert_close(out.loss, torch.nn.functional.softplus(-1000 * h))  # DPO
    assert torch.all(out.stats["u"] == 0)
    obj.observe({"logit": np.array([3.0, -4.0, 2.0, 5.0]), "user_id": np.array([1, 2, 1, 1])})
    out = obj(_errors(h, [1, 2]))
    u = out.stats["u"]
    assert obj.noise.active and 0 < u[0] < u[1] < 1  # the contradicted pair is the likelier flip
    eps = out.stats["eps_user"].double().numpy()
    p = sigmoid(obj.noise.tau * 1000 * h.double().numpy())
    np.testing.assert_allclose(u.numpy(), posterior_flip(p, eps), rtol=1e-6)
    torch.testing.assert_close(out.loss, conservative_dpo_loss(h, 1000.0, u))


@pytest.mark.slow
def test_em_dpo_two_ranks_killed_and_resumed_equals_uninterrupted(shards64, tmp_path):
    """2 ranks x 4 pairs, 8 steps, checkpoints every 3, SIGKILL after step 5: the rerun of the same
    command ends with the same EM state and the same per-step metrics as an uninterrupted run."""
    common = [
        "objective.name=em_dpo",
        "objective.noise.warmup_pairs=16",
        "objective.noise.calib_window=32",
        "data.micro_batch=4",
        "checkpoint.every=3",
        "train.max_steps=8",
        "checkpoint.export=false",
        "data.flip_rate=0.3",
        "data.flip_by=user",
    ]
    run = tmp_path / "killed"
    p = train(
        shards64, run, *common, nproc=2, module="tests.helpers.train_killed", extra_env={"KILL_AT_STEP": 5}
    )
    assert p.returncode != 0 and (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    check(train(shards64, run, *common, nproc=2))
    ref = tmp_path / "uninterrupted"
    check(train(shards64, ref, *common, nproc=2))

    def state(r):
        tag = (r / "checkpoints" / "latest").read_text().strip()
        return load_file(str(r / "checkpoints" / tag / "objective.safetensors"))

    a, b = state(ref), state(run)
    assert a["p"].numel() == 8 * 8 - 8  # every pair of both ranks from the micro-step that reached 16 on
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    ma, mb = read_metrics(ref / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in mb] == list(range(1, 9))
    assert any(r["u"] > 0 for r in ma)  # the posterior is in use after the warm-up
    for ra, rb in zip(ma, mb):
        for k in ("loss", "u", "eps_global", "tau", "h"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["step"], k)
