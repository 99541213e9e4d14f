"""Config of ``stages.sample``: prompts + a model -> D3PO trajectory shards (``pipeline.d3po.trajectories``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from annotated_types import Ge, Interval

from pipeline.schema.common import Count, Device, Dtype, NonNegInt, Resolution, Text
from pipeline.schema.encode import JobLayout

# eta = 0 is deterministic DDIM: a step with no density, so no policy ratio to train on
Eta = Annotated[float, Interval(gt=0, le=1)]
# K: at least one pair per prompt; 8 bounds a group's size (K x (steps + 1) latents in one sample)
ImagesPerPrompt = Annotated[int, Interval(ge=2, le=8)]
Guidance = Annotated[float, Ge(1)]  # 1: no guidance (the conditional prediction alone)
JpegQuality = Annotated[int, Interval(ge=1, le=100)]


@dataclass
class SampleModel:
    path: Text  # base diffusers folder (sd15): text encoder, VAE, scheduler, and the default UNet
    unet: Text | None = None  # sample from: exported UNet / LoRA folder / run folder / checkpoints/step_N
    dtype: Dtype = "fp32"  # the UNet's; latents are stored (and stepped) in fp16 either way
    text_dtype: Dtype = "fp32"  # text encoder; embeddings are stored (and used) as fp16 either way
    vae_dtype: Dtype = "fp32"  # decodes x_0 to the stored JPEGs only
    device: Device = "auto"  # auto: cuda:LOCAL_RANK when present, else cpu


@dataclass
class SamplePrompts:
    source: Text  # text file (a prompt a line) or Pick-a-Pic parquet file/dir/glob (its distinct captions)
    max: Count | None = (
        None  # only the first N prompts; empty ones and ones over 77 tokens are skipped, counted
    )


@dataclass
class SampleSampler:
    steps: Count = 20  # DDIM steps N: N transitions per trajectory, N + 1 latents
    eta: Eta = 1.0  # DDIM stochasticity; D3PO samples at 1
    guidance: Guidance = 5.0  # classifier-free guidance scale (D3PO: 5.0)
    images_per_prompt: ImagesPerPrompt = 2  # K images per prompt, all from the same initial noise x_T
    resolution: Resolution = 512  # pixels; a multiple of the VAE factor
    seed: NonNegInt = 0  # prompt i's noise comes from a generator seeded by (seed, i)


@dataclass
class SampleOutput:
    dir: Text  # output: shard-NNNNNN.tar + .json records, uncond.npy, plan.json, manifest.json, jobs/
    shard_size: Count = 256  # prompt groups per shard
    jpeg_quality: JpegQuality = 95  # the decoded images, for rewards and people


@dataclass
class SampleRun:
    batch_size: Count = 4  # prompt groups per UNet call (K images each, x2 with guidance)
    # Memory of the decode: SD1.5's VAE decoding 512 px in fp32 takes about 0.8 GiB an image, so 1 (or 4:
    # 3.2 GiB) fits a 16 GB V100 beside the fp16 UNet (1.7 GB), the text encoder and VAE (0.5 GB), the
    # UNet's cached activations and the CUDA context, where a whole call of 8 groups x K=2 (16 images,
    # ~13 GiB) does not. 1 also makes an image's pixels a function of its own x_0: convolution kernels
    # are chosen by batch size (oneDNN, cuDNN), so a batched decode can round an image differently.
    decode_batch: Count = 1  # images per VAE decode call; >1 may round differently: same for every job
    verify_existing: bool = True  # re-hash finished shards before skipping them


@dataclass
class SampleConfig:
    """Prompts that are empty (or whitespace) are skipped as ``empty_prompt``; prompts longer than the
    tokenizer's 77 tokens (with its start and end tokens) are skipped as ``prompt_too_long`` rather
    than truncated, so every stored embedding is of its whole prompt."""

    model: SampleModel
    prompts: SamplePrompts
    output: SampleOutput
    sampler: SampleSampler = field(default_factory=SampleSampler)
    run: SampleRun = field(default_factory=SampleRun)
    dist: JobLayout = field(default_factory=JobLayout)
