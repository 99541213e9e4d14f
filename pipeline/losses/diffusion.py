"""The diffusion error ``e_m`` shared by every model and every objective (docs/method.md, "Notation").

A batch of B pairs goes through each model as one batch of 2B: winners first, then losers, with the
same timestep and the same noise for a pair's winner and loser. For model m,

    e_m(z) = mean over C, H, W of (y - f_m(z_t, t, c))^2        (per image, float32)

where y is the noise (epsilon prediction), the velocity (v-prediction) or the clean latent
(sample prediction), per the scheduler's ``prediction_type``.

The scheduler's side (``pair_inputs``: noise, timesteps, noised latents and targets of a batch, drawn
from a generator seeded by ``step_seed``) is separate from the model's (``run_unet``) and from the
error (``diffusion_errors``): training (``pipeline.train.pair_step``) and evaluation
(``pipeline.evaluate.preference``) make the same inputs and errors from the same calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PairErrors:
    """Per-pair diffusion errors of one model: ``w`` on winners, ``l`` on losers, each [B] float32."""

    w: torch.Tensor
    l: torch.Tensor  # noqa: E741 - the paper's notation

    @property
    def d(self) -> torch.Tensor:
        """d_m = e_m(z_w) - e_m(z_l), [B]."""
        return self.w - self.l

    def detach(self) -> PairErrors:
        return PairErrors(self.w.detach(), self.l.detach())


def pair_noise(
    latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One noise and one timestep per pair, repeated for winner and loser.

    latents [2B, C, H, W] -> noise [2B, C, H, W] (noise[:B] == noise[B:]), timesteps [2B] int64.
    """
    n2 = latents.shape[0]
    if n2 % 2:
        raise ValueError(f"latents: expected a batch of 2B (winners then losers), got {n2} rows")
    b = n2 // 2
    noise = torch.randn(
        (b, *latents.shape[1:]), generator=generator, device=latents.device, dtype=torch.float32
    )
    t = torch.randint(0, num_train_timesteps, (b,), generator=generator, device=latents.device)
    return noise.repeat(2, 1, 1, 1).to(latents.dtype), t.repeat(2)


def training_target(
    prediction_type: str, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet is trained to predict, per the scheduler's ``prediction_type``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"prediction_type {prediction_type!r}: expected epsilon, v_prediction or sample")


def pair_errors(
    model_output: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor | None = None
) -> PairErrors:
    """Per-pair errors of winners and losers from a 2B batch (rows [:B] winners, [B:] losers).

    model_output, target: [2B, ...]; timesteps [2B] (optional): checked to be shared within each pair.
    The mean is over every non-batch dimension, computed in float32 (fp16/bf16 outputs are upcast).
    """
    if model_output.shape != target.shape:
        raise ValueError(
            f"model output {tuple(model_output.shape)} and target {tuple(target.shape)} differ in shape"
        )
    if model_output.dim() < 2 or model_output.shape[0] % 2:
        raise ValueError(
            f"expected a batch of 2B rows (winners then losers) with per-row features, got {tuple(model_output.shape)}"
        )
    b = model_output.shape[0] // 2
    if timesteps is not None:
        if timesteps.shape != (2 * b,):
            raise ValueError(f"timesteps: expected shape ({2 * b},), got {tuple(timesteps.shape)}")
        if not torch.equal(timesteps[:b], timesteps[b:]):
            raise ValueError(
                "timesteps differ between a pair's winner and loser: they must share t (and the noise)"
            )
    err = (model_output.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return PairErrors(err[:b], err[b:])


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """The seed of a micro-step's noise and timesteps: a resumed run draws what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class UNetInputs:
    sample: torch.Tensor  # [2B, C, h, w] noised latents, compute dtype
    timesteps: torch.Tensor  # [2B]
    text: torch.Tensor  # [2B, 77, D]
    added: dict | None  # SDXL: text_embeds [2B, P], time_ids [2B, 6]
    target: torch.Tensor  # [2B, C, h, w] float32

    def first_half(self) -> UNetInputs:
        b = self.sample.shape[0] // 2
        added = None if self.added is None else {k: v[:b] for k, v in self.added.items()}
        return UNetInputs(self.sample[:b], self.timesteps[:b], self.text[:b], added, self.target[:b])


def pair_inputs(
    batch: dict,
    scheduler,
    prediction_type: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    sample_latents: bool = False,
) -> UNetInputs:
    """The UNet inputs and targets of a collated batch of pairs (``pipeline.data.loader``): one
    timestep and one noise per pair (``pair_noise``), from a generator on ``device`` seeded with
    ``seed`` (``step_seed``). ``sample_latents``: latents drawn from the stored posterior (``std``)
    first, from the same generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lat = batch["latents"].to(device, torch.float32, non_blocking=True)
    if sample_latents and "std" in batch:
        lat = lat + batch["std"].to(device, torch.float32) * torch.randn(
            lat.shape, generator=gen, device=device
        )
    noise, t = pair_noise(lat, scheduler.config.num_train_timesteps, gen)
    noisy = scheduler.add_noise(lat, noise, t)
    target = training_target(prediction_type, scheduler, lat, noise, t)
    text = batch["text"].to(device, dtype, non_blocking=True)
    added = None
    if "pooled" in batch:
        pooled = batch["pooled"].to(device, dtype)
        # time_ids stay fp32: original sizes and crop offsets are integers, and bf16 keeps 8 significant
        # bits (1023 -> 1024, 777 -> 776); the UNet's Fourier projection computes in fp32 anyway
        added = {
            "text_embeds": torch.cat([pooled, pooled]),
            "time_ids": batch["time_ids"].to(device, torch.float32),
        }
    return UNetInputs(noisy.to(dtype), t, torch.cat([text, text]), added, target)


def run_unet(model: Callable, x: UNetInputs) -> torch.Tensor:
    """A UNet's prediction for ``x`` (a diffusers UNet, a DeepSpeed engine around one, a LoRA reference)."""
    kwargs = {"encoder_hidden_states": x.text}
    if x.added is not None:
        kwargs["added_cond_kwargs"] = x.added
    return model(x.sample, x.timesteps, **kwargs).sample


def diffusion_errors(out: torch.Tensor, x: UNetInputs, losers: bool = True) -> PairErrors:
    """The per-pair errors of a model's output ``out`` for ``x``; without ``losers`` (``x`` is the
    winners alone, ``UNetInputs.first_half``) the losers' errors are NaN."""
    if losers:
        # x comes from pair_inputs, which shares t within each pair by construction: no check here (on a
        # GPU comparing the timesteps would be a device -> host sync per forward)
        return pair_errors(out, x.target)
    e = (out.float() - x.target.float()).pow(2).flatten(1).mean(dim=1)
    return PairErrors(e, torch.full_like(e, float("nan")))
