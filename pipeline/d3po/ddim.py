"""The DDIM sampler step at eta > 0 as a Gaussian policy, and classifier-free guidance as sampled.

D3PO (docs/method.md, "D3PO") treats each denoising step ``x_t -> x_{t-1}`` as an action of a
policy: with eta > 0 the DDIM step draws ``x_{t-1} ~ N(mean, std^2)``, so a stored transition has a
log-density under any UNet, and the ratio of the policy's to the reference's density is what the loss
clamps. The sampler that records trajectories and the trainer that re-scores them must compute the
*same* function, down to the guidance and the float order, or a policy equal to the reference would not
give a ratio of exactly 1; that is why both go through ``cfg_noise_pred`` and
``ddim_step_with_logprob`` here.

With ``a_t = alphas_cumprod[t]``, ``a_p`` the same at ``t - T // n`` (the scheduler's
``final_alpha_cumprod`` past the end), and the model output turned into ``x0`` and ``e`` per the
scheduler's ``prediction_type`` (then clipped or thresholded as its config says)::

    var  = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p);     std = eta * sqrt(var)
    mean = sqrt(a_p) * x0 + sqrt(1 - a_p - std^2) * e
    log p(x_{t-1} | x_t) = mean over the non-batch elements of
                           -(x_{t-1} - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)

The mean is computed in float32 with diffusers' ``DDIMScheduler.step`` operations in diffusers'
order, so the same noise gives the same ``x_{t-1}`` as diffusers (for float32 inputs; fp16/bf16 inputs
are upcast first, where diffusers would compute in fp16). The log-density is accumulated in float64
and returned as float32 [B].

Where this differs from the authors' ``ddim_step_with_logprob`` (yk7333/D3PO, a patched copy of
diffusers' step): (1) a sampled ``x_{t-1}`` is cast to the sample's dtype *before* its log-density is
taken, so re-scoring the stored transition with the same UNet gives exactly the recorded value also for
fp16 latents (theirs scores the float32 value and stores the rounded one); (2) the previous timestep
follows diffusers (``final_alpha_cumprod`` when ``t - T // n < 0``) where theirs clamps it to 0 first,
which differs only for ``set_alpha_to_one=True`` (SD1.5 ships ``False``); (3) a step whose std is 0
(eta = 0, or ``a_p = 1``) is refused, since it has no density (theirs returns inf / nan).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _check(scheduler: DDIMScheduler, eta: float) -> None:
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(
            f"expected a diffusers DDIMScheduler, got {type(scheduler).__name__}: build one with "
            "DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no inference steps: call scheduler.set_timesteps(n) first")
    if not 0.0 < eta <= 1.0:
        raise ValueError(
            f"eta: the DDIM step is a Gaussian transition only for 0 < eta <= 1 (D3PO samples at 1), got {eta}"
        )
    pt = scheduler.config.prediction_type
    if pt not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {pt!r}: expected one of {', '.join(PREDICTION_TYPES)}")


def _schedule(
    scheduler: DDIMScheduler, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a_t, a_p and std as float32 [N, 1, ...] on the sample's device (N = 1, or B timesteps).

    Looked up on a CPU copy of alphas_cumprod, so the zero-std check waits on no device kernel."""
    t = torch.as_tensor(timestep).detach().to("cpu", torch.long).reshape(-1)
    b = sample.shape[0]
    if t.numel() not in (1, b):
        raise ValueError(f"timestep: expected one value or one per sample ({b}), got {t.numel()}")
    ac = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)
    if (t < 0).any() or (t >= ac.numel()).any():
        raise ValueError(f"timestep {t.tolist()}: outside the schedule's 0..{ac.numel() - 1}")
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = torch.as_tensor(scheduler.final_alpha_cumprod).detach().to("cpu", torch.float32)
    a_t = ac[t]
    a_p = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    # diffusers' DDIMScheduler._get_variance, elementwise
    variance = ((1 - a_p) / (1 - a_t)) * (1 - a_t / a_p)
    std = eta * variance ** (0.5)
    if not (std > 0).all():
        bad = t[~(std > 0)].tolist()
        raise ValueError(
            f"timestep {bad}: the DDIM step has zero variance there (alphas_cumprod of the previous step "
            "is 1, e.g. set_alpha_to_one=True at the last step), so the transition has no log-density; "
            "use set_alpha_to_one=False (Stable Diffusion's scheduler config)"
        )
    shape = (-1,) + (1,) * (sample.dim() - 1)
    return tuple(x.reshape(shape).to(sample.device) for x in (a_t, a_p, std))  # type: ignore[return-value]


def ddim_mean_std(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transition's mean (float32, shaped like ``sample``) and std (float32 [N, 1, ...]): diffusers'
    ``DDIMScheduler.step`` up to, not including, the added noise. The gradient flows through the mean
    into ``model_output``."""
    _check(scheduler, eta)
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ in shape "
            "(guidance combined? cfg_noise_pred returns one prediction per latent)"
        )
    a_t, a_p, std = _schedule(scheduler, timestep, sample, eta)
    x, out = sample.float(), model_output.float()
    b_t = 1 - a_t
    pt = scheduler.config.prediction_type
    if pt == "epsilon":
        x0 = (x - b_t ** (0.5) * out) / a_t ** (0.5)
        eps = out
    elif pt == "sample":
        x0 = out
        eps = (x - a_t ** (0.5) * x0) / b_t ** (0.5)
    else:  # v_prediction
        x0 = (a_t**0.5) * x - (b_t**0.5) * out
        eps = (a_t**0.5) * out + (b_t**0.5) * x
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    direction = (1 - a_p - std**2) ** (0.5) * eps
    mean = a_p ** (0.5) * x0 + direction
    return mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over the non-batch dims (the authors' code), as
    float32 [B]; accumulated in float64. ``x`` is data: no gradient flows into it."""
    d = x.detach().double() - mean.double()
    s = std.double()
    lp = -(d**2) / (2 * s**2) - torch.log(s) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.dim()))).float()


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step ``x_t -> x_{t-1}`` and the log-density of ``x_{t-1}``: ``(prev_sample, log_prob)``.

    Sampling: give ``noise`` (the standard normal draw, shaped like ``sample``) or a ``generator``
    (float32 noise drawn as diffusers' ``randn_tensor`` draws it); ``prev_sample = mean + std * noise``,
    in ``sample``'s dtype. Scoring a stored transition: give ``prev_sample`` (no noise, no generator);
    it is returned cast to ``sample``'s dtype. ``timestep`` is an int, a 0-d tensor or one per sample
    [B]. ``log_prob`` is float32 [B] and carries the gradient of ``model_output``.
    """
    if prev_sample is not None and (noise is not None or generator is not None):
        raise ValueError("give prev_sample (to score a transition) or noise/generator (to sample), not both")
    if noise is not None and generator is not None:
        raise ValueError("give noise or a generator, not both")
    mean, std = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        elif noise.shape != sample.shape:
            raise ValueError(f"noise {tuple(noise.shape)} and sample {tuple(sample.shape)} differ in shape")
        # cast before scoring: the stored (rounded) sample is the one the trainer will re-score
        prev_sample = (mean + std * noise.float()).to(sample.dtype)
    elif prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample {tuple(prev_sample.shape)} and sample {tuple(sample.shape)} differ in shape"
        )
    prev_sample = prev_sample.detach().to(sample.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def cfg_noise_pred(
    unet: Callable,
    latents: torch.Tensor,
    t: int | torch.Tensor,
    text: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
    added: dict[str, torch.Tensor] | None = None,
    added_uncond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The UNet's prediction under classifier-free guidance, float32: ``u + guidance * (c - u)``.

    One forward on ``[uncond; cond]`` (the authors' order), so the sampler and the trainer, which both
    call this, run the same batch layout and the same arithmetic. ``text`` [B, L, D]; ``uncond`` [B, L, D]
    or [1, L, D] (broadcast); ``t`` an int, 0-d or [B]. ``added`` / ``added_uncond``: SDXL's
    ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) for the two halves. ``guidance == 1`` runs the
    conditional forward alone (u + 1 * (c - u) is c up to rounding; the uncond forward would be wasted).
    ``unet`` is anything called like a diffusers UNet (a module, a DeepSpeed engine, a LoRA reference).
    """
    b = latents.shape[0]
    tt = torch.as_tensor(t, device=latents.device).reshape(-1)
    if tt.numel() == 1:
        tt = tt.expand(b)
    elif tt.numel() != b:
        raise ValueError(f"t: expected one timestep or one per latent ({b}), got {tt.numel()}")
    if guidance == 1.0:
        kw = {} if added is None else {"added_cond_kwargs": added}
        return unet(latents, tt, encoder_hidden_states=text, **kw).sample.float()
    if uncond is None:
        raise ValueError(f"guidance {guidance} needs the unconditional embedding (uncond)")
    if uncond.shape[0] != b:
        uncond = uncond.expand(b, *uncond.shape[1:])
    kw = {}
    if added is not None or added_uncond is not None:
        if added is None or added_uncond is None or set(added) != set(added_uncond):
            raise ValueError("added and added_uncond: give both, with the same keys (SDXL)")
        kw["added_cond_kwargs"] = {
            k: torch.cat([added_uncond[k].expand(b, *added_uncond[k].shape[1:]), added[k]]) for k in added
        }
    out = unet(
        torch.cat([latents, latents]),
        torch.cat([tt, tt]),
        encoder_hidden_states=torch.cat([uncond, text]),
        **kw,
    ).sample.float()
    u, c = out.chunk(2)
    return u + guidance * (c - u)
