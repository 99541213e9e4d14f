"""Images + captions -> VAE latents + text embeddings, batched, in the configured dtype and device."""

from __future__ import annotations

import torch

from pipeline.models import ModelInfo, load_text_encoders, load_vae


class Encoder:
    """Holds the VAE and the text encoder(s) of one model folder.

    ``encode_images``: pixels [N, 3, R, R] in [-1, 1] -> (mean, std), each [N, C, R/f, R/f] float32,
    already multiplied by the VAE scaling factor (std is None unless asked for).
    ``encode_text``: captions -> hidden states [N, 77, D] (SDXL: both encoders' penultimate states,
    concatenated) and the pooled embedding [N, P] (SDXL) or None.
    """

    def __init__(
        self, info: ModelInfo, device: torch.device, vae_dtype: torch.dtype, text_dtype: torch.dtype
    ):
        self.info = info
        self.device = device
        self.vae_dtype = vae_dtype
        self.vae = load_vae(info, vae_dtype, device)
        self.tokenizers, self.text_encoders = load_text_encoders(info, text_dtype, device)

    @torch.no_grad()
    def encode_images(
        self, pixels: torch.Tensor, with_std: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dist = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        sf = self.info.scaling_factor
        mean = dist.mean.float() * sf
        std = dist.std.float() * sf if with_std else None
        return mean, std

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        states, pooled = [], None
        for name, tok, enc in zip(self.info.family.text_encoders, self.tokenizers, self.text_encoders):
            ids = tok(
                captions,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            idx = self.info.family.hidden_state_index
            states.append(out.last_hidden_state if idx == -1 else out.hidden_states[idx])
            if name == self.info.family.pooled_from:
                pooled = out.text_embeds.float()
        return torch.cat(states, dim=-1).float(), pooled
