"""Config of ``stages.encode``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Dtype = Literal["float32", "float16", "bfloat16"]


@dataclass
class EncodeModel:
    path: str  # local diffusers model folder (sd15 or sdxl; the family is read from model_index.json)
    vae_dtype: Dtype = "float32"  # SDXL's VAE overflows in float16: keep float32 there
    text_dtype: Dtype = "float32"  # text encoder(s); states are stored as float16 either way
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda:LOCAL_RANK when present, else cpu


@dataclass
class EncodeData:
    source: str  # a parquet file, a directory of parquet files, or a glob
    resolution: int = 512  # shorter side resize + centre crop, in pixels
    extra_columns: list[str] = field(default_factory=list)  # source columns copied into each pair's json

    def check(self) -> list[str]:
        return [] if self.resolution >= 8 else [f"resolution: must be >= 8, got {self.resolution}"]


@dataclass
class EncodeOutput:
    dir: str  # output: shard-NNNNNN.tar + .json records, plan.json, manifest.json, jobs/
    shard_size: int = 1000  # pairs per shard
    latent_dtype: Literal["float16", "float32"] = "float16"  # stored latents
    store_std: bool = False  # also store the latent std, so training can sample z = mean + std * eps

    def check(self) -> list[str]:
        return [] if self.shard_size >= 1 else [f"shard_size: must be >= 1, got {self.shard_size}"]


@dataclass
class EncodeRun:
    batch_size: int = 16  # pairs per VAE call (2x images)
    decode_threads: int = 4  # JPEG decode + resize threads
    verify_existing: bool = True  # re-hash finished shards before skipping them


@dataclass
class JobLayout:
    rank: int | None = None  # this job's index; default: RANK, SLURM_PROCID, else 0
    world_size: int | None = None  # number of jobs; default: WORLD_SIZE, SLURM_NTASKS, else 1

    def check(self) -> list[str]:
        if (self.rank is None) != (self.world_size is None):
            return ["rank/world_size: give both or neither"]
        if self.world_size is not None and not (self.world_size >= 1 and 0 <= self.rank < self.world_size):
            return [f"rank: {self.rank} is not in [0, world_size={self.world_size})"]
        return []


@dataclass
class EncodeConfig:
    model: EncodeModel
    data: EncodeData
    output: EncodeOutput
    run: EncodeRun = field(default_factory=EncodeRun)
    dist: JobLayout = field(default_factory=JobLayout)
