"""One training micro-step on pairs: noise a batch of pairs, run the models the objective needs, return the loss.

Winners and losers go through every model as one batch of 2B (winners first). One timestep and one
noise per pair, shared by its winner and loser, drawn from a generator seeded by (seed, rank,
micro-step): a resumed run draws exactly what the uninterrupted one drew. The reference and the EMA
models run under no_grad in the same step, on the same inputs; the EMA models only while the
objective reads them (``Objective.ema_active``: the adaptive objectives after their warm-up).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.data.annotator_weights import AnnotatorWeights
from pipeline.engine.context import RunContext
from pipeline.engine.ema import ShardedEMA
from pipeline.losses.diffusion import UNetInputs, diffusion_errors, pair_inputs, run_unet, step_seed
from pipeline.losses.objectives import LossOutput, ModelErrors, Objective


class PreferenceStep:
    def __init__(
        self,
        objective: Objective,
        scheduler,
        prediction_type: str,
        ctx: RunContext,
        seed: int,
        sample_latents: bool = False,
        annotator_weights: AnnotatorWeights | None = None,
    ):
        self.objective = objective
        self.annotator_weights = annotator_weights
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.ctx = ctx
        self.seed = seed
        self.sample_latents = sample_latents

    def inputs(self, batch: dict, micro_step: int) -> UNetInputs:
        ctx = self.ctx
        return pair_inputs(
            batch,
            self.scheduler,
            self.prediction_type,
            ctx.device,
            ctx.dtype,
            step_seed(self.seed, ctx.rank, micro_step),
            self.sample_latents,
        )

    def __call__(
        self,
        policy: Callable,
        reference: Callable | None,
        ema: ShardedEMA | None,
        batch: dict,
        micro_step: int,
    ) -> LossOutput:
        """Per-pair losses [B] (the trainer backpropagates their mean) and per-pair statistics."""
        losers = self.objective.needs_losers
        x = self.inputs(batch, micro_step)
        if not losers:
            x = x.first_half()
        ref_err, ema_errs = None, []
        use_ema = self.objective.ema_active and ema is not None
        with torch.no_grad():
            if use_ema:
                ema.prefetch(0)  # with several ranks its all-gather overlaps the reference forward
            if self.objective.needs_reference:
                ref_err = diffusion_errors(run_unet(reference, x), x, losers)
            if use_ema:
                for k in range(len(ema)):
                    module = ema.gather(k)
                    if k + 1 < len(ema) and ema.buffers > 1:
                        ema.prefetch(k + 1)  # into the other buffer, during this forward
                    ema_errs.append(diffusion_errors(run_unet(module, x), x, losers))
        pol_err = diffusion_errors(run_unet(policy, x), x, losers)
        fields = {k: batch[k].to(self.ctx.device) for k in self.objective.batch_fields}
        out = self.objective(ModelErrors(pol_err, ref_err, ema_errs, fields))
        if self.annotator_weights is None:
            return out
        uid = fields["user_id"] if "user_id" in fields else batch["user_id"].to(self.ctx.device)
        w = self.annotator_weights.lookup(uid)
        return LossOutput(out.loss * w, out.stats | {"annotator_weight": w})
