"""Config of ``stages.encode``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.schema.common import Count, Device, Dtype, NonNegInt, Resolution, Text


@dataclass
class EncodeModel:
    path: Text  # local diffusers model folder (sd15 or sdxl; the family is read from model_index.json)
    vae_dtype: Dtype = "fp32"  # fp16 with a VAE whose config sets force_upcast (SDXL's) runs in fp32
    text_dtype: Dtype = "fp32"  # text encoder(s); states are stored as fp16 either way
    device: Device = "auto"  # auto: cuda:LOCAL_RANK when present, else cpu


@dataclass
class EncodeData:
    source: Text  # a parquet file, a directory of parquet files, or a glob
    resolution: Resolution = 512  # shorter side resize + centre crop, in pixels
    extra_columns: list[Text] = field(default_factory=list)  # source columns copied into each pair's json
    optional_columns: list[Text] = field(default_factory=list)  # the same where a file has them, else null


@dataclass
class EncodeOutput:
    dir: Text  # output: shard-NNNNNN.tar + .json records, plan.json, manifest.json, jobs/
    shard_size: Count = 1000  # pairs per shard
    latent_dtype: Literal["fp16", "fp32"] = "fp16"  # stored latents
    store_std: bool = False  # also store the latent std, so training can sample z = mean + std * eps


@dataclass
class EncodeRun:
    batch_size: Count = 16  # pairs per batch (2x images) and captions per text encoder call
    vae_batch: Count = 4  # images per VAE call: a batch runs in sub-batches of it (fp32 activations: ~0.6 GiB per 512 px image, ~2.5 GiB per 1024 px)
    decode_threads: Count = 4  # JPEG decode + resize threads
    verify_existing: bool = True  # re-hash finished shards before skipping them


@dataclass
class JobLayout:
    rank: NonNegInt | None = None  # this job's index; default: RANK, SLURM_PROCID, else 0
    world_size: Count | None = None  # number of jobs; default: WORLD_SIZE, SLURM_NTASKS, else 1

    def check(self) -> list[str]:
        if (self.rank is None) != (self.world_size is None):
            return ["rank/world_size: give both or neither"]
        if self.world_size is not None and not self.rank < self.world_size:
            return [f"rank: {self.rank} is not in [0, world_size={self.world_size})"]
        return []


@dataclass
class EncodeConfig:
    model: EncodeModel
    data: EncodeData
    output: EncodeOutput
    run: EncodeRun = field(default_factory=EncodeRun)
    dist: JobLayout = field(default_factory=JobLayout)
