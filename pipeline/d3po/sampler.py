"""The D3PO sampling loop as library code: prompts in, trajectories of K images per prompt out.

``screen_prompts`` drops the prompts (``pipeline.data.prompts.read_prompt_source``) that cannot be
sampled faithfully, by reason. ``TrajectorySampler.sample`` runs DDIM with classifier-free guidance
through ``pipeline.d3po.ddim`` (``cfg_noise_pred`` + ``ddim_step_with_logprob``, the functions the
trainer re-scores with) for a batch of prompt groups. Every random draw of a group (its x_T, then the
noise of every step, K images at a time) comes from that group's own CPU generator, so a group's
trajectories do not depend on which groups share its batch, on the job layout or on the device.

The final latents are decoded ``decode_batch`` images per VAE call (default 1). One image per call makes
every image a function of its own x_0 alone: convolution kernels pick their algorithm by batch size
(oneDNN on the CPU, cuDNN's heuristics on CUDA), so a batched decode can round an image differently
depending on its batch size, and uint8 rounding turns that into changed pixels. Measured on the CPU
(torch 2.13, oneDNN's convolutions and the channels-last GroupNorm): a latent decoded alone or within
a batch differs by up to 1e-5 (the tiny VAE) or 2e-5 (an SD-sized VAE, random weights), and a few
pixels round differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDIMScheduler

from pipeline.d3po.ddim import cfg_noise_pred, ddim_step_with_logprob

LATENT_DTYPE = torch.float16  # the trajectory format's (pipeline.d3po.trajectories)


@dataclass
class Screened:
    kept: list[int]  # prompt indices to sample, in order
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_indices: dict[str, list[int]] = field(default_factory=dict)


def screen_prompts(prompts: list[str], tokenizer) -> Screened:
    """Skip empty prompts (``empty_prompt``) and prompts the text encoder would truncate: more tokens,
    start and end token included, than ``tokenizer.model_max_length`` (``prompt_too_long``; a
    truncated prompt's images would be scored against text the model never saw)."""
    out = Screened(kept=[])
    nonempty = [i for i, p in enumerate(prompts) if p.strip()]
    lengths = {}
    for b in range(0, len(nonempty), 1024):
        idx = nonempty[b : b + 1024]
        ids = tokenizer([prompts[i] for i in idx], truncation=False, verbose=False).input_ids
        lengths.update({i: len(x) for i, x in zip(idx, ids)})
    for i in range(len(prompts)):
        why = "" if i in lengths else "empty_prompt"
        if not why and lengths[i] > tokenizer.model_max_length:
            why = "prompt_too_long"
        if why:
            out.skipped[why] = out.skipped.get(why, 0) + 1
            out.skipped_indices.setdefault(why, []).append(i)
        else:
            out.kept.append(i)
    return out


def make_scheduler(model_path: str, steps: int) -> DDIMScheduler:
    """The model's schedule as DDIM with ``steps`` steps. ``set_alpha_to_one=False`` (Stable Diffusion's
    own setting; diffusers' default is True): with True the last step's variance is 0, so its transition
    has no density and could not be trained on."""
    sched = DDIMScheduler.from_pretrained(model_path, subfolder="scheduler", set_alpha_to_one=False)
    sched.set_timesteps(steps)
    return sched


def scheduler_config(sched: DDIMScheduler) -> dict:
    """The scheduler's config as plain JSON (``DDIMScheduler.from_config`` rebuilds it)."""
    return {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in sched.config.items() if not k.startswith("_")
    }


@dataclass
class GroupResult:
    latents: np.ndarray  # float16 [K, N+1, C, h, w]
    log_probs: np.ndarray  # float32 [K, N]
    images: np.ndarray  # uint8 [K, H, W, 3]


class TrajectorySampler:
    """Holds the UNet, the VAE and the schedule; ``sample`` turns a batch of prompt groups into their
    trajectories. ``uncond`` is the float16 unconditional embedding [1, 77, D] (the folder's)."""

    def __init__(
        self,
        unet,
        vae,
        scheduler: DDIMScheduler,
        uncond: torch.Tensor,
        *,
        eta: float,
        guidance: float,
        images_per_prompt: int,
        latent_shape: tuple[int, int, int],
        scaling_factor: float,
        device: torch.device,
        decode_batch: int = 1,
    ):
        if decode_batch < 1:
            raise ValueError(f"decode_batch={decode_batch}: must be >= 1")
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.unet_dtype = next(unet.parameters()).dtype
        self.vae_dtype = next(vae.parameters()).dtype
        self.uncond = uncond.to(device, LATENT_DTYPE).to(self.unet_dtype)
        self.eta, self.guidance, self.k = eta, guidance, images_per_prompt
        self.latent_shape = tuple(latent_shape)
        self.scaling_factor = scaling_factor
        self.device = device
        self.decode_batch = decode_batch

    @property
    def timesteps(self) -> np.ndarray:
        return self.scheduler.timesteps.cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def sample(self, text: torch.Tensor, seeds: list[int]) -> list[GroupResult]:
        """``text``: float16 [b, 77, D], one prompt per group; ``seeds``: each group's generator seed."""
        k, shape = self.k, self.latent_shape
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        x_T = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        x = (x_T * self.scheduler.init_noise_sigma).to(LATENT_DTYPE).repeat_interleave(k, 0).to(self.device)
        cond = text.to(self.device, LATENT_DTYPE).to(self.unet_dtype).repeat_interleave(k, 0)
        traj, logps = [x], []
        for t in self.scheduler.timesteps:
            eps = cfg_noise_pred(self.unet, x.to(self.unet_dtype), t, cond, self.uncond, self.guidance)
            noise = torch.cat([torch.randn((k, *shape), generator=g, dtype=torch.float32) for g in gens])
            x, lp = ddim_step_with_logprob(self.scheduler, eps, t, x, self.eta, noise=noise.to(self.device))
            traj.append(x)
            logps.append(lp)
        lat = torch.stack(traj, 1).cpu().numpy()
        lps = torch.stack(logps, 1).cpu().numpy().astype(np.float32)
        images = self.decode(x)
        return [
            GroupResult(lat[j * k : (j + 1) * k], lps[j * k : (j + 1) * k], images[j * k : (j + 1) * k])
            for j in range(len(seeds))
        ]

    def decode(self, x0: torch.Tensor) -> np.ndarray:
        """Latents x_0 (scaled) -> uint8 [B, H, W, 3], as diffusers' image processor rounds them;
        ``decode_batch`` images per VAE call, each chunk's pixels moved to the host before the next, so
        the device holds one chunk's activations (about 0.8 GiB an image at 512 px in fp32)."""
        return np.concatenate(
            [self._decode(x0[i : i + self.decode_batch]) for i in range(0, len(x0), self.decode_batch)]
        )

    def _decode(self, x0: torch.Tensor) -> np.ndarray:
        img = self.vae.decode((x0.float() / self.scaling_factor).to(self.vae_dtype)).sample.float()
        img = (img / 2 + 0.5).clamp(0, 1)
        return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
