"""Config of ``stages.online``: D3PO's online loop, rounds of sample -> [label] -> feedback -> train -> evaluate,
each phase run by its own stage with a config built from the file and overrides named here."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.schema.common import Count, NonNegFloat, NonNegInt, Positive, Text
from pipeline.schema.feedback import RewardName


@dataclass
class OnlineModel:
    path: Text  # base diffusers folder (sd15): samples round 0, and is the frozen reference of every round


@dataclass
class OnlineEval:
    prompts: Text  # text file of the evaluation prompts: the same prompts and seeds every round
    seed: NonNegInt = 1_000_000  # sampler.seed of every evaluation: only the policy changes between rounds
    # e.g. a reward one watches but does not train on, or [brightness] for a loop fed the `random` control
    rewards: list[RewardName] | None = (
        None  # rewards the evaluation scores (any feedback reward); null: the feedback's own
    )


@dataclass
class OnlineLabel:
    """With feedback from people (the feedback config's ``source: human``): every round's samples are
    labelled in the labelling service, and the round goes on when they are (pipeline/label/rounds.py)."""

    db: Text | None = None  # the campaign: SQLite file or postgresql:// URL; null: <out>/labels.db
    config: Text = (
        "configs/label/default.yaml"  # the service's config: server, assignment.per_item (R), items.mode
    )
    overrides: list[Text] = field(default_factory=list)  # e.g. ['server.port=8080', 'assignment.per_item=3']
    serve: bool = True  # start the service for the loop's lifetime (false: one already serves db)
    deadline_min: NonNegFloat = (
        0.0  # close a round this long after it opens, once it has a label; 0: no deadline
    )
    poll_s: Positive = 5.0  # how often the loop reads the round's progress


@dataclass
class OnlineConfig:
    """Every round trains the same run (``<out>/run``) ``steps_per_round`` optimizer steps further; the
    stage configs' own model / data / output keys are set by the loop and need not be given."""

    model: OnlineModel
    out: Text  # the loop's folder: round_NNN/, run/ (the one training run), eval_base/, report.json
    prompts: Text  # text file of the training prompts, sampled afresh by the current policy every round
    eval: OnlineEval
    rounds: Count = 2  # sample -> feedback -> train -> evaluate, this many times
    steps_per_round: Count = 10  # optimizer steps per round: round r trains up to (r + 1) x steps_per_round
    seed: NonNegInt = 0  # round r samples its training prompts with a hash of (seed, r): fresh noise, none shared with another seed's loop
    sample_config: Text = "configs/sample/tiny.yaml"  # stages.sample config of the training and eval samples
    sample_overrides: list[Text] = field(default_factory=list)  # key=value for it, e.g. [run.batch_size=4]
    feedback_config: Text = (
        "configs/feedback/tiny.yaml"  # stages.feedback config (source: rewards, or human with label.*)
    )
    feedback_overrides: list[Text] = field(default_factory=list)  # e.g. ['rewards=[jpeg_compressibility]']
    train_config: Text = "configs/train/tiny_d3po.yaml"  # stages.train config (objective.name=d3po)
    train_overrides: list[Text] = field(default_factory=list)  # e.g. [model.lora_rank=4, checkpoint.every=5]
    label: OnlineLabel = field(default_factory=OnlineLabel)  # feedback from people (source: human)
    train_nproc: Count = 1  # >1: torch.distributed.run --standalone --nproc_per_node N (one node)
