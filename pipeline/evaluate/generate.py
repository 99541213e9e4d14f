"""Seeded generation through the diffusers pipeline, and PNG grids."""

from __future__ import annotations

import inspect

import torch
from PIL import Image, ImageDraw

from pipeline.data.prompts import read_prompt_source
from pipeline.errors import UserError


def read_prompts(path: str, max_prompts: int) -> list[str]:
    """The evaluation's prompts: ``generation.prompts`` read by the one rule every stage reads prompt
    files by (``pipeline.data.prompts.read_prompt_source``: every line a prompt), its empty prompts
    left out, then the first ``max_prompts``."""
    prompts = [p for p in read_prompt_source(path, key="generation.prompts").prompts if p]
    if not prompts:
        raise UserError(f"generation.prompts={path}: no prompts (one per line)")
    return prompts[:max_prompts]


def build_pipeline(info, dtype: torch.dtype, device: torch.device):
    """The model family's diffusers pipeline for evaluation images, built to fit one 16 GB GPU:

    - the UNet stays on the CPU: the caller puts one UNet at a time on ``device`` (``pipe.unet``);
      every other module (text encoders, VAE) goes to ``device`` now;
    - the VAE decodes one image at a time (``enable_slicing``): SDXL's VAE, upcast to fp32, needs
      several GiB per 1024 px image, so a batch of four at once would not fit beside the UNet;
    - no safety checker (SD1.5's folders name one): it replaces every image it flags by a black one,
      which would score as a poor image for any reward and bias every model's mean."""
    import diffusers

    cls = getattr(diffusers, info.family.pipeline_class)
    kwargs = {}
    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        kwargs = {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(info.path, torch_dtype=dtype, **kwargs)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and name != "unet":
            module.to(device)
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe, prompts: list[str], seed: int, steps: int, guidance: float, resolution: int | None, batch_size: int
) -> list[Image.Image]:
    """Image i uses a generator seeded with seed + i, the same for every model evaluated."""
    device = pipe.unet.device
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b : b + batch_size]
        gens = [torch.Generator(device=device).manual_seed(seed + b + i) for i in range(len(chunk))]
        out = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, generator=gens
        )
        images += out.images
    return images


def grid(
    rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2, label_w: int = 170
) -> Image.Image:
    """rows of equally sized images -> one PNG-able image, with an optional label per row."""
    w, h = rows[0][0].size
    lw = label_w if labels else 0
    canvas = Image.new("RGB", (lw + len(rows[0]) * (w + pad), len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        if labels:
            draw.text((4, r * (h + pad) + h // 2 - 6), labels[r][:28], fill="black")
        for c, img in enumerate(row):
            canvas.paste(img, (lw + c * (w + pad), r * (h + pad)))
    return canvas
