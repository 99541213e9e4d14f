"""Config of ``stages.feedback``: D3PO trajectories (``stages.sample``) -> per-pair preferences
(``pipeline.d3po.feedback``), from scripted rewards or from people's labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Interval, MinLen

from pipeline.schema.common import Count, Device, Dtype, NonNegInt, Text

# the rewards of pipeline.d3po.rewards (which checks that its registry makes exactly these):
# rewards backed by a scorer of the evaluation stage, each loaded from the folder given for it
SCORER_REWARDS = ("aesthetic", "pickscore", "hpsv2", "imagereward")
SCRIPTED_REWARDS = ("brightness", "jpeg_compressibility", "jpeg_incompressibility", "random")
BASE_REWARDS = (*SCRIPTED_REWARDS, *SCORER_REWARDS)
# every name the registry (and the config) accepts: each reward and its negation
REWARD_NAMES = (*BASE_REWARDS, *(f"-{n}" for n in BASE_REWARDS))

RewardName = Literal[REWARD_NAMES]  # type: ignore[valid-type]  # each reward and its '-' negation
RewardNames = Annotated[list[RewardName], MinLen(1)]
# 0.5 would make the feedback a coin toss, and above it the flips are the majority
FlipRate = Annotated[float, Interval(ge=0, lt=0.5)]


@dataclass
class FeedbackScorers:
    aesthetic: Text | None = None  # folder: clip/ + head.safetensors or head.pth (LAION aesthetic MLP)
    pickscore: Text | None = None  # transformers CLIPModel folder (PickScore_v1)
    hpsv2: Text | None = None  # transformers CLIPModel folder (HPS v2 via tools.convert_openclip)
    imagereward: Text | None = None  # folder: blip/ + head.safetensors (ImageReward MLP)
    device: Device = "auto"  # auto: cuda when present, else cpu
    dtype: Dtype = "fp32"  # the scorer models' weights
    batch_size: Count = 32  # images per scorer call (whole groups; the scripted rewards ignore it)


@dataclass
class FeedbackConfig:
    """``source`` chooses the feedback: the scripted ``rewards``, or people's labels in ``human``."""

    trajectories: Text  # trajectory folder of stages.sample (manifest.json + shard-NNNNNN.tar)
    out: Text  # output folder: preferences.parquet + summary.json, each replaced atomically
    source: Literal["rewards", "human"] = "rewards"  # scripted rewards, or people's labels (human=FILE)
    rewards: RewardNames = field(
        default_factory=lambda: ["jpeg_compressibility"]
    )  # source=rewards: several by Pareto dominance (a tie unless one image is >= on all, > on one); -NAME reverses
    human: Text | None = None  # source=human: the label export's image_preferences.jsonl (or its folder)
    unknown_images: Literal["error", "skip"] = "error"  # source=human: a label of an image not in the folder
    flip_rate: FlipRate = 0.0  # share of decided preferences reversed on purpose (noisy / minority feedback)
    flip_seed: NonNegInt = 0  # which pairs flip: a hash of (unit, seed), the same in every run
    flip_by: Literal["pair", "prompt"] = "pair"  # unit of flipping: each pair, or every pair of a prompt
    verify: bool = True  # check each shard's sha256 against the manifest before reading it
    scorers: FeedbackScorers = field(default_factory=FeedbackScorers)

    def check(self) -> list[str]:
        errors = []
        if self.source == "human" and self.human is None:
            errors.append("human: required with source=human (image_preferences.jsonl of the label export)")
        if self.source == "rewards" and self.human is not None:
            errors.append(
                f"human: given ({self.human}) but source=rewards; give source=human to use people's labels"
            )
        if self.source == "human":
            return errors  # the rewards are not used
        bases = [n.lstrip("-") for n in self.rewards]
        for base in sorted({b for b in bases if bases.count(b) > 1}):
            errors.append(f"rewards: {base} is named more than once (with '-': every pair would be a tie)")
        for base in sorted(set(bases) & set(SCORER_REWARDS)):
            if getattr(self.scorers, base) is None:
                errors.append(f"scorers.{base}: required by rewards=[..., {base}]: a local scorer folder")
        return errors
