"""Config of ``stages.evaluate``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class EvalModels:
    base: str | None = None  # the starting model folder (default: the held-out shards' model)
    unets: dict[str, str] = field(
        default_factory=dict
    )  # name -> UNet folder, LoRA folder, checkpoints/step_N, or run dir
    include_ema: bool = True  # for a run dir: also its exported EMA models


@dataclass
class EvalPreference:
    shards: str | None = None  # held-out shards (null: skip preference accuracy)
    max_pairs: int = 500
    draws: int = 4  # (timestep, noise) draws per pair, identical for every model
    batch_size: int = 16
    seed: int = 1234


@dataclass
class EvalGeneration:
    prompts: str | None = None  # text file, one prompt a line (null: skip generation and scores)
    max_prompts: int = 500
    steps: int = 50  # sampler steps
    guidance: float = 7.5
    resolution: int | None = None  # null: the UNet's native size
    seed: int = 0  # image i of every model uses seed + i
    batch_size: int = 4
    grid_prompts: int = 8  # prompts shown in the PNG grids


@dataclass
class EvalScorers:
    pickscore: str | None = None  # transformers CLIPModel folder (PickScore_v1)
    hpsv2: str | None = None  # transformers CLIPModel folder (HPS v2 converted by tools.convert_openclip)
    aesthetic: str | None = None  # folder: clip/ (CLIP ViT-L/14) + head.safetensors or head.pth (LAION MLP)
    imagereward: str | None = (
        None  # folder: blip/ (BlipForImageTextRetrieval) + head.safetensors (ImageReward MLP)
    )


@dataclass
class EvalMinority:
    runs: dict[str, str] = field(default_factory=dict)  # name -> run dir with per-pair records
    bins: int = 10  # u bins of the flipped-share plot (equal counts)
    high_u_quantile: float = 0.9  # "high u": above this quantile of u over the run
    min_user_pairs: int = 5  # annotators with fewer pairs are listed apart
    last_epochs: int = 1  # use each pair's records from the last N epochs of the run


@dataclass
class EvalConfig:
    output: str  # report folder: report.json, report.md, *.png, images/
    models: EvalModels = field(default_factory=EvalModels)
    preference: EvalPreference = field(default_factory=EvalPreference)
    generation: EvalGeneration = field(default_factory=EvalGeneration)
    scorers: EvalScorers = field(default_factory=EvalScorers)
    minority: EvalMinority = field(default_factory=EvalMinority)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
