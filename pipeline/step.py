"""One training micro-step: noise a batch of pairs, run the models the objective needs, return the loss.

Winners and losers go through every model as one batch of 2B (winners first). One timestep and one
noise per pair, shared by its winner and loser, drawn from a generator seeded by (seed, rank,
micro-step): a resumed run draws exactly what the uninterrupted one drew. The reference and the EMA
models run under no_grad in the same step, on the same inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.engine.ema import ShardedEMA
from pipeline.losses.diffusion import PairErrors, pair_errors, pair_noise, training_target
from pipeline.losses.objectives import LossOutput, ModelErrors, Objective


def step_seed(seed: int, rank: int, micro_step: int) -> int:
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


def run_unet(model: Callable, x: UNetInputs) -> torch.Tensor:
    kwargs = {"encoder_hidden_states": x.text}
    if x.added is not None:
        kwargs["added_cond_kwargs"] = x.added
    return model(x.sample, x.timesteps, **kwargs).sample


class PreferenceStep:
    def __init__(
        self,
        objective: Objective,
        scheduler,
        prediction_type: str,
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
        rank: int,
        sample_latents: bool = False,
    ):
        self.objective = objective
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.T = scheduler.config.num_train_timesteps
        self.dtype, self.device = dtype, device
        self.seed, self.rank = seed, rank
        self.sample_latents = sample_latents

    def inputs(self, batch: dict, micro_step: int) -> UNetInputs:
        dev, dt = self.device, self.dtype
        gen = torch.Generator(device=dev).manual_seed(step_seed(self.seed, self.rank, micro_step))
        lat = batch["latents"].to(dev, torch.float32, non_blocking=True)
        if self.sample_latents and "std" in batch:
            lat = lat + batch["std"].to(dev, torch.float32) * torch.randn(
                lat.shape, generator=gen, device=dev
            )
        noise, t = pair_noise(lat, self.T, gen)
        noisy = self.scheduler.add_noise(lat, noise, t)
        target = training_target(self.prediction_type, self.scheduler, lat, noise, t)
        text = batch["text"].to(dev, dt, non_blocking=True)
        added = None
        if "pooled" in batch:
            pooled = batch["pooled"].to(dev, dt)
            # time_ids stay fp32: original sizes and crop offsets are integers, and bf16 keeps 8 significant
            # bits (1023 -> 1024, 777 -> 776); the UNet's Fourier projection computes in fp32 anyway
            added = {
                "text_embeds": torch.cat([pooled, pooled]),
                "time_ids": batch["time_ids"].to(dev, torch.float32),
            }
        return UNetInputs(noisy.to(dt), t, torch.cat([text, text]), added, target)

    def errors(self, out: torch.Tensor, x: UNetInputs) -> PairErrors:
        if self.objective.needs_losers:
            return pair_errors(out, x.target, x.timesteps)
        e = (out.float() - x.target.float()).pow(2).flatten(1).mean(dim=1)
        return PairErrors(e, torch.full_like(e, float("nan")))

    def __call__(
        self,
        policy: Callable,
        reference: Callable | None,
        ema: ShardedEMA | None,
        batch: dict,
        micro_step: int,
        metric_active: bool,
    ) -> LossOutput:
        """Per-pair losses [B] (the trainer backpropagates their mean) and per-pair statistics."""
        x = self.inputs(batch, micro_step)
        if not self.objective.needs_losers:
            x = x.first_half()
        ref_err, ema_errs = None, []
        use_ema = self.objective.uses_ema and metric_active and ema is not None
        with torch.no_grad():
            if use_ema:
                ema.prefetch(0)  # with several ranks its all-gather overlaps the reference forward
            if self.objective.needs_reference:
                ref_err = self.errors(run_unet(reference, x), x)
            if use_ema:
                for k in range(len(ema)):
                    module = ema.gather(k)
                    if k + 1 < len(ema) and ema.buffers > 1:
                        ema.prefetch(k + 1)  # into the other buffer, during this forward
                    ema_errs.append(self.errors(run_unet(module, x), x))
        pol_err = self.errors(run_unet(policy, x), x)
        fields = {k: batch[k].to(self.device) for k in self.objective.batch_fields}
        return self.objective(ModelErrors(pol_err, ref_err, ema_errs, fields), metric_active=metric_active)


@contextlib.contextmanager
def adapters_disabled(module):
    """LoRA: the reference is the same UNet with its adapters off."""
    module.disable_adapters()
    try:
        yield module
    finally:
        module.enable_adapters()


class LoraReference:
    """Callable reference for LoRA runs: the policy's own module with adapters disabled."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.module):
            return self.module(*args, **kwargs)
