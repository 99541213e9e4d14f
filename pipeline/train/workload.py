"""The seam between the shared trainer and what it trains on: a *workload* is a data stream plus a step.

``stages/train.py`` is one recipe for every kind of training. What it shares: the DeepSpeed engine
(ZeRO-2, precision, loss scaling, gradient accumulation), the reference and EMA models, checkpoints
and resume (``pipeline.engine``), the per-pair statistics all-gather and the logs
(``pipeline.train.stats``, ``pipeline.metrics_log``), signals and the non-finite guard. What a
workload brings, chosen by the objective's ``data_kind`` (``pipeline.train.registry.WORKLOADS``:
``"pairs"``, encoded preference-pair shards and ``pipeline.train.pair_step.PreferenceStep``, in
``pipeline.train.pairs``; ``"trajectories"``, D3PO on sampled denoising trajectories, in
``pipeline.train.trajectories``):

- ``__init__(cfg, objective)``: check the data *before any model loads* (``UserError`` naming the
  bad key or file), and set ``info`` (``pipeline.models.ModelInfo``): the model whose UNet is trained;
- ``prepare(ctx)``: after the process group exists (``pipeline.engine.context.RunContext``):
  collective data checks, and the step's tools;
- ``batches(start)``: an iterator of micro-batches from micro-step ``start`` on. Each batch is a dict
  with ``micro_step`` (int, must equal the trainer's counter), ``epoch`` (int), ``substituted``
  (int, samples replaced because they could not be read), the per-pair fields named in
  ``pair_fields`` as [B] tensors, and whatever the step reads;
- ``step(models, batch, micro_step) -> LossOutput``: the per-pair losses [B] (the trainer
  backpropagates their mean through ``models.policy``, the DeepSpeed engine) and per-pair statistics
  [B] (detached; the same names on every rank at a given step). The trainer has called
  ``objective.begin_step`` with the optimizer step first: run the EMA models only while
  ``objective.ema_active``;
- ``pair_fields``: name -> dtype of the per-pair batch fields that are all-gathered after every
  micro-step with the step's statistics (integers exactly, as int64), for logging and for the
  objective's ``observe`` hook;
- ``pairs_per_step(world)``: preference pairs per optimizer step (for pairs/s);
- ``data_state()`` / ``resume_position(state)``: what the checkpoint records about the data
  position (JSON, saved as ``state["data"]`` beside the micro-step counter ``state["micro_step"]``),
  and the micro-step a resumed run continues at (the saved one, or a remapped one when the data
  layout changed, e.g. another world size);
- ``records(batch)``: per-pair columns for ``pairs/rank_*/upto_*.parquet`` (``key`` at least);
- ``summary(cat)``: workload-specific scalars from the gathered per-pair arrays since the last log
  line (``cat``), e.g. statistics split by flipped labels.

Notes for a workload:

- one micro-step may be one timestep index of a batch of trajectory pairs (as the trajectory workload
  does): ``batches`` then yields the same trajectories T times with ``micro_step`` advancing and a
  timestep index in the batch, and the data position is ``micro_step // T`` batches plus
  ``micro_step % T``; ``train.grad_accum`` must then be the number of trained timesteps (times the
  accumulation over batches) so that DeepSpeed accumulates the gradient over the timesteps of one
  optimizer step;
- ``models.reference`` (the frozen starting UNet, or for LoRA the adapters-off policy) is there when
  ``objective.needs_reference``: compute its outputs inside ``step`` under ``no_grad``;
- ``models.ema`` (``ShardedEMA``, or None) exists when ``ema.decays`` is set; a step may ignore it;
- RNG: draw noise from a generator seeded by ``pipeline.losses.diffusion.step_seed(seed, rank,
  micro_step)`` so that a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pipeline.engine.context import RunContext
from pipeline.engine.ema import ShardedEMA
from pipeline.losses.objectives import LossOutput, Objective
from pipeline.models import ModelInfo
from pipeline.schema.train import TrainConfig


@dataclass
class Models:
    """The models a step may run: the policy (the DeepSpeed engine: call it for a forward with a
    gradient), the frozen reference (None when the objective needs none) and the EMA models."""

    policy: Callable
    reference: Callable | None
    ema: ShardedEMA | None


class Workload:
    pair_fields: ClassVar[dict[str, torch.dtype]] = {}

    def __init__(self, cfg: TrainConfig, objective: Objective):
        self.cfg, self.objective = cfg, objective
        self.info: ModelInfo

    def prepare(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def batches(self, start: int) -> Iterator[dict]:
        raise NotImplementedError

    def step(self, models: Models, batch: dict, micro_step: int) -> LossOutput:
        raise NotImplementedError

    def pairs_per_step(self, world: int) -> int:
        raise NotImplementedError

    def data_state(self) -> dict:
        return {}

    def resume_position(self, state: dict) -> int:
        return state["micro_step"]

    def records(self, batch: dict) -> dict[str, list]:
        return {"key": list(batch["keys"])}

    def summary(self, cat: dict[str, np.ndarray]) -> dict[str, float]:
        return {}
