"""The diffusion error ``e_m`` shared by every model and every objective (docs/method.md, "Notation").

A batch of B pairs goes through each model as one batch of 2B: winners first, then losers, with the
same timestep and the same noise for a pair's winner and loser. For model m,

    e_m(z) = mean over C, H, W of (y - f_m(z_t, t, c))^2        (per image, float32)

where y is the noise (epsilon prediction), the velocity (v-prediction) or the clean latent
(sample prediction), per the scheduler's ``prediction_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
