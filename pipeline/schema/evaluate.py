"""Config of ``stages.evaluate``."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.schema.common import Count, Device, Dtype, NonNegFloat, NonNegInt, Quantile, Resolution, Text


@dataclass
class EvalModels:
    base: Text | None = None  # the starting model folder (default: the held-out shards' model)
    unets: dict[str, Text] = field(
        default_factory=dict
    )  # name -> UNet folder, LoRA folder, checkpoints/step_N, or run dir
    include_ema: bool = True  # for a run dir: also its exported EMA models


@dataclass
class EvalPreference:
    shards: Text | None = None  # held-out shards (null: skip preference accuracy)
    max_pairs: Count = 500
    draws: Count = 4  # (timestep, noise) draws per pair, identical for every model
    batch_size: Count = 16
    seed: NonNegInt = 1234


@dataclass
class EvalGeneration:
    prompts: Text | None = None  # text file, one prompt a line (null: skip generation and scores)
    max_prompts: Count = 500
    steps: Count = 50  # sampler steps
    guidance: NonNegFloat = 7.5  # classifier-free guidance scale (<= 1: none)
    resolution: Resolution | None = None  # null: the UNet's native size
    seed: NonNegInt = 0  # image i of every model uses seed + i
    batch_size: Count = 4  # prompts per pipeline call (x2 latents with guidance); decoded one at a time
    grid_prompts: Count = 8  # prompts shown in the PNG grids


@dataclass
class EvalScorers:
    pickscore: Text | None = None  # transformers CLIPModel folder (PickScore_v1)
    hpsv2: Text | None = None  # transformers CLIPModel folder (HPS v2 converted by tools.convert_openclip)
    aesthetic: Text | None = None  # folder: clip/ (CLIP ViT-L/14) + head.safetensors or head.pth (LAION MLP)
    imagereward: Text | None = (
        None  # folder: blip/ (BlipForImageTextRetrieval) + head.safetensors (ImageReward MLP)
    )


@dataclass
class EvalMinority:
    runs: dict[str, Text] = field(default_factory=dict)  # name -> run dir with per-pair records
    bins: Count = 10  # u bins of the flipped-share plot (equal counts)
    high_u_quantile: Quantile = 0.9  # "high u": above this quantile of u over the run
    min_user_pairs: Count = 5  # annotators with fewer pairs are listed apart
    last_epochs: Count = 1  # use each pair's records from the last N epochs of the run
    # the annotator audit scores every training pair again with the run's final UNet, this many
    # (timestep, noise) draws per pair (2 x draws forward passes per pair and model; see
    # pipeline/evaluate/train_margins.py); 0: it reads each pair's h from the step that trained it
    audit_draws: NonNegInt = 2
    audit_batch_size: Count = 16


@dataclass
class EvalConfig:
    output: Text  # report folder: report.json, report.md, *.png, images/
    models: EvalModels = field(default_factory=EvalModels)
    preference: EvalPreference = field(default_factory=EvalPreference)
    generation: EvalGeneration = field(default_factory=EvalGeneration)
    scorers: EvalScorers = field(default_factory=EvalScorers)
    minority: EvalMinority = field(default_factory=EvalMinority)
    device: Device = "auto"
    dtype: Dtype = "fp32"  # every model and scorer runs in it
