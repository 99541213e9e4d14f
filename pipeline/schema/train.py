"""Config of ``stages.train``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.schema.objective import ObjectiveConfig


@dataclass
class TrainModel:
    path: str | None = None  # default: the model named in the shards' manifest (must match it)
    lora_rank: int = 0  # 0: full fine-tuning; > 0: LoRA on the attention projections (authors: 8)
    lora_alpha: float | None = None  # null: = lora_rank
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    attention: Literal["auto", "xformers", "sdpa"] = "auto"  # auto: xformers when installed and on CUDA
    gradient_checkpointing: bool = False
    channels_last: bool = False
    reference_dtype: Literal["auto", "float32", "float16", "bfloat16"] = (
        "auto"  # auto: the training precision
    )

    def check(self) -> list[str]:
        return [] if self.lora_rank >= 0 else [f"lora_rank: must be >= 0, got {self.lora_rank}"]


@dataclass
class TrainData:
    shards: str  # directory with manifest.json (from stages.encode)
    micro_batch: int = 1  # pairs per rank per micro-step (2x images through the UNet)
    num_workers: int = 2  # data loader workers per rank (0: in the training process)
    shuffle_buffer: int = 1000  # samples; the order is a seeded function of the epoch and layout
    seed: int = 0
    resolution: int | None = None  # expected resolution: refuse shards of another one
    flip_rate: float = 0.0  # synthetic minority: share of labels flipped (deterministic per unit)
    flip_seed: int = 0
    flip_by: Literal["pair", "user", "prompt"] = "pair"  # unit of flipping
    sample_latents: bool = False  # z = mean + std * eps (needs shards encoded with output.store_std)
    verify_sha256: bool = False  # hash every shard against the manifest before training

    def check(self) -> list[str]:
        errs = []
        if self.micro_batch < 1:
            errs.append(f"micro_batch: must be >= 1, got {self.micro_batch}")
        if self.num_workers < 0:
            errs.append(f"num_workers: must be >= 0, got {self.num_workers}")
        if not 0 <= self.flip_rate <= 1:
            errs.append(f"flip_rate: must be in [0, 1], got {self.flip_rate}")
        if self.shuffle_buffer < 1:
            errs.append(f"shuffle_buffer: must be >= 1, got {self.shuffle_buffer}")
        return errs


@dataclass
class Optim:
    lr: float = 1e-5  # Diffusion-DPO full fine-tuning: 1e-8 * total batch; LoRA (authors): 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up, then constant (Diffusion-DPO recipe)
    grad_clip: float = 1.0  # 0: off
    impl: Literal["auto", "torch", "fused"] = (
        "auto"  # auto: DeepSpeed's FusedAdam on CUDA, torch AdamW on CPU
    )

    def check(self) -> list[str]:
        errs = [] if len(self.betas) == 2 else [f"betas: expected two numbers, got {self.betas}"]
        if self.lr <= 0:
            errs.append(f"lr: must be > 0, got {self.lr}")
        return errs


@dataclass
class TrainLoop:
    max_steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro-steps per optimizer step; total batch = micro_batch * grad_accum * world
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # V100: fp16 (dynamic loss scaling); A100/H100: bf16
    seed: int = 0  # noise and timesteps: a function of (seed, rank, micro-step)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1
    max_nonfinite: int = 5  # consecutive non-finite losses (steps skipped) before the run stops
    auroc_window: int = 2048  # pairs in the sliding window of the AUROC of u against flips

    def check(self) -> list[str]:
        errs = []
        for k in ("max_steps", "grad_accum", "log_every", "max_nonfinite"):
            if getattr(self, k) < 1:
                errs.append(f"{k}: must be >= 1, got {getattr(self, k)}")
        return errs


@dataclass
class EMAConfig:
    decays: list[float] = field(default_factory=list)  # one EMA model each (authors' code: [0.9999, 0.5])
    half_lives: list[float] = field(
        default_factory=list
    )  # or: in optimizer steps, decay = 0.5 ** (1 / half_life)
    offload: bool = True  # fp32 shards in CPU memory (pinned); false: on the accelerator
    overlap_gather: bool = False  # >1 rank: next EMA all-gather during a forward (+1 model buffer)

    @property
    def all_decays(self) -> list[float]:
        """The decays of every EMA model: ``decays``, then those of ``half_lives``."""
        return list(self.decays) + [0.5 ** (1.0 / h) for h in self.half_lives]

    def check(self) -> list[str]:
        errs = [f"decays: {d} is not in [0, 1)" for d in self.decays if not 0 <= d < 1]
        return errs + [f"half_lives: {h} is not > 0" for h in self.half_lives if not h > 0]


@dataclass
class Checkpointing:
    every: int = 500  # optimizer steps; also on SIGTERM / SIGINT and at the end
    keep: int = 3  # most recent complete checkpoints kept
    export: bool = True  # at the end: the policy and each EMA as diffusers UNet folders (or LoRA weights)


@dataclass
class TrainOutput:
    dir: str  # run folder: config.yaml, metrics.jsonl, tensorboard/, pairs/, checkpoints/, export/
    tensorboard: bool = True
    pair_records: bool = True  # per-pair parquet records (key, user, flipped, h per model, u, W, G)


@dataclass
class TrainConfig:
    data: TrainData
    output: TrainOutput
    model: TrainModel = field(default_factory=TrainModel)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: Optim = field(default_factory=Optim)
    train: TrainLoop = field(default_factory=TrainLoop)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: Checkpointing = field(default_factory=Checkpointing)

    check_reads = ("objective", "ema")  # a bad value in another section does not hide this rule

    def check(self) -> list[str]:
        errs = []
        if self.objective.name in ("adaptive_dpo", "adaptive_ipo") and not self.ema.all_decays:
            errs.append(
                "ema.decays: the adaptive objectives need at least one EMA model (authors' code: [0.9999, 0.5])"
            )
        return errs


# keys that may change between a checkpoint and the run that resumes it
RESUMABLE_KEYS = (
    "train.max_steps",
    "train.log_every",
    "train.device",
    "train.max_nonfinite",
    "train.auroc_window",
    "data.num_workers",
    "data.shards",
    "data.verify_sha256",
    "checkpoint.",
    "output.tensorboard",
    "ema.offload",
    "model.attention",
    "model.gradient_checkpointing",
    "model.channels_last",
)
