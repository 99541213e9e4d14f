"""Images + captions -> VAE latents + text embeddings, batched, in the configured dtype and device."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from pipeline.models import ModelInfo, load_text_encoders, load_vae

log = logging.getLogger("pipeline.encoders")


def vae_compute_dtype(info: ModelInfo, requested: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in: ``requested``, except fp16 for a VAE whose config.json sets
    ``force_upcast: true`` (SDXL's: it overflows in fp16 and gives NaN latents), which runs in fp32,
    as diffusers' own pipelines upcast it. A config without the key (SD1.5's VAE predates it, and
    diffusers' SD1.5 pipeline never upcasts) keeps fp16."""
    if requested != torch.float16:
        return requested
    path = Path(info.path) / "vae" / "config.json"
    if json.loads(path.read_text()).get("force_upcast") is not True:
        return requested
    log.warning(
        "model.vae_dtype=fp16, but %s sets force_upcast (this VAE overflows in fp16: NaN latents): "
        "running the VAE in fp32. To run it in fp16, put a VAE fixed for fp16 whose config has "
        "force_upcast false (e.g. madebyollin/sdxl-vae-fp16-fix) in the model's vae/ folder; "
        "model.vae_dtype=fp32 says the same without this warning",
        path,
    )
    return torch.float32


def _contiguous_output(module, args, output):
    return output.contiguous()


@contextlib.contextmanager
def _per_image_cpu_convs():
    """CPU convolutions that compute each image on its own, whatever the batch size: ATen picks oneDNN
    or its own im2col + GEMM kernel by batch size (oneDNN for a batch of 2 or more or a large input,
    for 1x1 filters on one thread only from 16 images on) and NNPACK from 16 images on, and their
    float sums differ in the last bits. With both off, every convolution is ATen's im2col + GEMM,
    one image at a time. Process-wide flags, restored on exit."""
    mkldnn = torch.backends.mkldnn.enabled
    nnpack = torch.backends.nnpack.set_flags(False)[0]
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        torch.backends.nnpack.set_flags(nnpack)


class Encoder:
    """Holds the VAE and the text encoder(s) of one model folder.

    ``encode_images``: pixels [N, 3, R, R] in [-1, 1] -> (mean, std), each [N, C, R/f, R/f] float32,
    already multiplied by the VAE scaling factor (std is None unless asked for); the VAE runs over
    ``vae_batch`` images at a time, and each image's latents do not depend on it (on the CPU: bit
    for bit; see ``encode_images``).
    ``encode_text``: captions -> hidden states [N, 77, D] (SDXL: both encoders' penultimate states,
    concatenated) and the pooled embedding [N, P] (SDXL) or None.
    """

    def __init__(
        self, info: ModelInfo, device: torch.device, vae_dtype: torch.dtype, text_dtype: torch.dtype
    ):
        self.info = info
        self.device = device
        self.vae_dtype = vae_compute_dtype(info, vae_dtype)
        self.vae = load_vae(info, self.vae_dtype, device)
        # The attention block returns a transposed view, whose layout the next GroupNorm and convolution
        # read as channels-last for 2+ images but not for one (a size-1 batch dimension makes the
        # strides ambiguous), and the channels-last GroupNorm on the CPU splits its sums over the
        # threads by batch (from 32x32 latents on): float sums that changed with the batch size.
        # Contiguous: the NCHW kernels, one image's sums in one place, for any batch and device.
        from diffusers.models.attention_processor import Attention

        for m in self.vae.encoder.modules():
            if isinstance(m, Attention):
                m.register_forward_hook(_contiguous_output)
        self.tokenizers, self.text_encoders = load_text_encoders(info, text_dtype, device)

    @torch.no_grad()
    def encode_images(
        self, pixels: torch.Tensor, with_std: bool = False, vae_batch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``vae_batch`` images per VAE call (None: all in one). On the CPU the results are the same
        bits for any ``vae_batch`` (tested): convolutions per image (``_per_image_cpu_convs``), and a
        single image is encoded beside a copy of itself, because one image alone takes a
        multi-threaded GEMM where 2+ take one thread per image. On CUDA, cuDNN picks its kernels per
        shape, so the last bits of fp32 latents may change with ``vae_batch``."""
        n = len(pixels)
        step = max(1, vae_batch or n)
        cpu = self.device.type == "cpu"
        means, stds = [], []
        with _per_image_cpu_convs() if cpu else contextlib.nullcontext():
            for b in range(0, n, step):
                x = pixels[b : b + step].to(self.device, self.vae_dtype)
                k = len(x)
                if cpu and k == 1:
                    x = torch.cat([x, x])
                dist = self.vae.encode(x).latent_dist
                means.append(dist.mean[:k])
                if with_std:
                    stds.append(dist.std[:k])
        sf = self.info.scaling_factor
        mean = torch.cat(means).float() * sf
        std = torch.cat(stds).float() * sf if with_std else None
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
