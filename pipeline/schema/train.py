"""Config of ``stages.train``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, get_args

from pipeline.schema.common import (
    Count,
    Decay,
    Device,
    Dtype,
    Names,
    NonNegFloat,
    NonNegInt,
    Pair,
    Positive,
    Probability,
    Resolution,
    Text,
)
from pipeline.schema.objective import ObjectiveConfig, TrajectoryObjectiveName


@dataclass
class TrainModel:
    path: Text | None = None  # default: the model named in the shards' manifest (must match it)
    lora_rank: NonNegInt = 0  # 0: full fine-tuning; > 0: LoRA on the attention projections (authors: 8)
    lora_alpha: Positive | None = None  # null: = lora_rank
    lora_targets: Names = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    attention: Literal["auto", "xformers", "sdpa"] = "auto"  # auto: xformers when installed and on CUDA
    gradient_checkpointing: bool = False
    reference_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: the training precision


@dataclass
class TrainData:
    shards: Text  # directory with manifest.json (from stages.encode; objective d3po: from stages.sample)
    preferences: Text | None = None  # objective d3po: stages.feedback's out folder or its parquet
    micro_batch: Count = 1  # pairs per rank per micro-step (2x images through the UNet)
    num_workers: NonNegInt = 2  # data loader workers per rank (0: in the training process)
    shuffle_buffer: Count = 1000  # samples; the order is a seeded function of the epoch and layout
    seed: NonNegInt = 0
    resolution: Resolution | None = None  # expected resolution: refuse shards of another one
    flip_rate: Probability = 0.0  # synthetic minority: share of labels flipped (deterministic per unit)
    flip_seed: NonNegInt = 0
    flip_by: Literal["pair", "user", "prompt"] = "pair"  # unit of flipping
    sample_latents: bool = False  # z = mean + std * eps (needs shards encoded with output.store_std)
    verify_sha256: bool = False  # hash each shard before training (ranks share the work); refuse a mismatch
    # each pair's loss times its annotator's weight, min(1, cap / labels) at mean 1; pair objectives only
    annotator_weights: Text | None = None  # annotator_weights.json of tools.annotator_weights


@dataclass
class Optim:
    lr: Positive = 1e-5  # Diffusion-DPO full fine-tuning: 1e-8 * total batch; LoRA (authors): 1e-5
    weight_decay: NonNegFloat = 0.01
    betas: Annotated[list[Decay], Pair] = field(default_factory=lambda: [0.9, 0.999])  # Adam's decays
    eps: Positive = 1e-8
    warmup_steps: NonNegInt = 0  # linear warm-up, then constant (Diffusion-DPO recipe)
    grad_clip: NonNegFloat = 1.0  # 0: off
    impl: Literal["auto", "torch", "fused"] = (
        "auto"  # auto/torch: torch's fused AdamW; fused: DeepSpeed's FusedAdam (JIT build)
    )


@dataclass
class LossScaling:
    """fp16's dynamic loss scaling (DeepSpeed's): on a gradient overflow the step is skipped and,
    after ``hysteresis`` overflows, the scale halves; after ``window`` clean steps it doubles."""

    initial_power: NonNegInt = 16  # fp16: the scale starts at 2**initial_power
    window: Count = 1000  # fp16: steps without an overflow before the scale doubles
    hysteresis: Count = 2  # fp16: the n-th overflow within a window halves the scale (earlier: skip only)
    min_scale: Positive = 1.0  # fp16: the scale never goes below it


@dataclass
class TrainLoop:
    max_steps: Count = 100  # optimizer steps
    grad_accum: Count = 1  # micro-steps per optimizer step; total batch = micro_batch * grad_accum * world
    precision: Dtype = "fp32"  # V100: fp16 (dynamic loss scaling); A100/H100: bf16
    seed: NonNegInt = 0  # noise and timesteps: a function of (seed, rank, micro-step)
    device: Device = "auto"
    log_every: Count = 1
    max_nonfinite: Count = 5  # consecutive non-finite losses (steps skipped) before the run stops
    auroc_window: Count = 2048  # pairs in the sliding window of the AUROC of u against flips
    fp16_on_cpu: bool = False  # allow fp16 on the CPU: for tests of the V100 path (slow, not for training)
    # ZeRO-2 partitions gradients and reduce-scatters them on every micro-step; ZeRO-1 keeps a whole
    # gradient per GPU (+2 bytes/parameter: SD1.5 1.6 GiB, SDXL 4.8 GiB) and communicates once per
    # optimizer step: fewer collectives where grad_accum is large and the interconnect slow
    zero_stage: Literal[1, 2] = 2
    tf32: bool = True  # sm80+ (A100, H100): fp32 matmuls and convolutions (fp32 runs, the VAE-free fp32 parts) on TF32 tensor cores
    loss_scale: LossScaling = field(default_factory=LossScaling)


@dataclass
class EMAConfig:
    decays: list[Decay] = field(default_factory=list)  # one EMA model each (authors' code: [0.9999, 0.5])
    half_lives: list[Positive] = field(default_factory=list)  # or in steps: decay = 0.5 ** (1 / half_life)
    half_life_fractions: list[Positive] = field(default_factory=list)  # x train.max_steps, into half_lives
    offload: bool = True  # fp32 shards in CPU memory (pinned); false: on the accelerator
    overlap_gather: bool = (
        False  # resident false, >1 rank: next EMA all-gather during a forward (+1 model buffer)
    )
    resident: bool = True  # a gather buffer per EMA model, filled once per optimizer step (+1 UNet in the compute dtype per EMA model); false: one, refilled each micro-step
    background_update: bool = (
        True  # offloaded shards on CUDA: the CPU update runs in a thread beside the next micro-steps
    )

    @property
    def all_decays(self) -> list[float]:
        """The decays of every EMA model: ``decays``, then those of ``half_lives``."""
        return list(self.decays) + [0.5 ** (1.0 / h) for h in self.half_lives]


@dataclass
class Checkpointing:
    every: Count = 500  # optimizer steps; also on SIGTERM / SIGINT / SIGUSR1 and at the end
    keep: Count = 3  # most recent complete checkpoints kept
    export: bool = True  # at the end: the policy and each EMA as diffusers UNet folders (or LoRA weights)


@dataclass
class DistTimeouts:
    timeout_min: Positive = (
        30.0  # a collective waiting longer aborts the run (NCCL watchdog; DeepSpeed's own: 10)
    )
    universal_wait_min: Positive = 240.0  # other ranks wait this long for rank 0's universal conversion


@dataclass
class TrainOutput:
    dir: Text  # run folder: config.yaml, metrics.jsonl, tensorboard/, pairs/, checkpoints/, export/
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
    dist: DistTimeouts = field(default_factory=DistTimeouts)

    check_reads = ("objective", "ema")  # the sections check() reads: a bad value elsewhere does not hide it

    def __post_init__(self) -> None:
        # EMA half-lives given as fractions of the run become steps here, so the resolved config names
        # the half-lives used, and a resume with another train.max_steps is refused (ema.half_lives differ)
        if self.ema.half_life_fractions:
            steps = [f * self.train.max_steps for f in self.ema.half_life_fractions]
            self.ema.half_lives, self.ema.half_life_fractions = [*self.ema.half_lives, *steps], []

    def check(self) -> list[str]:
        errs = []
        if (
            self.objective.name in ("adaptive_dpo", "adaptive_ipo", "adaptive_d3po")
            and not self.ema.all_decays
        ):
            errs.append(
                "ema.decays: the adaptive objectives need at least one EMA model (authors' code: [0.9999, 0.5])"
            )
        # data.preferences alone, read defensively: a bad value elsewhere in data must not hide this rule
        if getattr(self.data, "preferences", None) is not None and self.objective.name not in get_args(
            TrajectoryObjectiveName
        ):
            errs.append(
                "data.preferences: preference files of sampled trajectories train objective.name=d3po or "
                "adaptive_d3po only; "
                f"objective.name={self.objective.name} trains on the encoded pairs in data.shards (drop "
                "data.preferences)"
            )
        if getattr(self.data, "annotator_weights", None) is not None and self.objective.name in get_args(
            TrajectoryObjectiveName
        ):
            errs.append(
                f"data.annotator_weights: weighs labelled pairs of data.shards; objective.name={self.objective.name} "
                "trains on sampled trajectories (drop data.annotator_weights)"
            )
        return errs


# keys that may change between a checkpoint and the run that resumes it
RESUMABLE_KEYS = (
    "train.max_steps",
    "train.log_every",
    "train.device",
    "train.max_nonfinite",
    "train.auroc_window",
    "train.fp16_on_cpu",
    "train.tf32",
    "train.zero_stage",  # the same optimizer-state files for stages 1 and 2
    "data.num_workers",
    "data.shards",
    "data.preferences",  # like data.shards: the online loop gives each round's trajectories and feedback
    "data.verify_sha256",
    "checkpoint.",
    "dist.",
    "output.tensorboard",
    "ema.offload",
    "ema.resident",
    "ema.background_update",
    "ema.overlap_gather",
    "model.attention",
    "model.gradient_checkpointing",
    "model.channels_last",  # a removed key (ZeRO flattened the policy back to contiguous): old checkpoints carry it
)
