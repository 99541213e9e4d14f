"""The annotator audit's evidence: every training pair's margin h under the run's *final* policy.

A run's per-pair records hold each pair's h from the step that trained on it: a pair seen in the
first steps was judged by a policy that had learnt nothing yet (h = 0 at step 1), so with a handful
of labels per annotator most of an annotator's evidence is noise. Scoring every training pair again
after training, with the exported UNet against the reference and several (timestep, noise) draws per
pair, gives each pair the trained policy's verdict. On the heavy-tailed toy worlds (FINDINGS.md, "A
handful of labels each") it ranks wholly flipped annotators better than the records in 12 of 16
draws, worse by under 0.01 in 2 and by 0.05-0.30 in the 2 where the flipped annotators hold 38-49 %
of the labels and the policy learnt part of their view; on average the two tie.

The pairs are streamed from the run's ``data.shards`` twice (reference, then policy: one UNet on the
device at a time), in manifest order, as labelled; the run's ``data.flip_*`` then negate h of the
pairs the trainer flipped (a swapped pair under the same noise has d = -d exactly), so h is read
against the label the run trained on, and runs on the same shards share the reference's pass whatever
their flips. Cost: ``draws`` x 2 UNet forward passes per pair for the policy and as many for the
reference (once per shard set, kept as one float per pair and draw on the CPU), without gradients; a
training epoch costs about 8 forward-pass equivalents per pair (the policy's forward and backward on
both images, the reference's forward), so at 2 draws the audit is about half an epoch per run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.data.flips import is_flipped, unit_key
from pipeline.data.shards import load_manifest
from pipeline.engine.context import RunContext
from pipeline.errors import UserError
from pipeline.evaluate.preference import HeldOutDraws, implicit_margins, iter_pairs
from pipeline.models import ModelInfo, free_device, load_scheduler, load_unet


def training_pairs(
    run_config: dict, info: ModelInfo, ctx: RunContext, draws: int, batch_size: int, seed: int
):
    """The run's training pairs (``data.shards``) as streamed ``HeldOutDraws``, as labelled."""
    shards = (run_config.get("data") or {}).get("shards")
    if not shards:
        raise UserError("data.shards: the run's config names no training shards")
    manifest = load_manifest(shards)  # refuses a folder without one
    if manifest["model"]["config_hash"] != info.config_hash:
        raise UserError(f"data.shards={shards} were encoded with another model than {info.path}")
    return HeldOutDraws(
        lambda: iter_pairs(shards),
        manifest,
        load_scheduler(info),
        info.prediction_type,
        ctx,
        draws=draws,
        batch_size=batch_size,
        seed=seed,
        progress=f"audit {Path(shards).name}",
    )


def trained_flips(run_config: dict, keys, user_ids, captions) -> np.ndarray:
    """Which pairs the run trained on with winner and loser swapped (its ``data.flip_*``)."""
    d = run_config.get("data") or {}
    rate, seed, by = (
        float(d.get("flip_rate") or 0.0),
        int(d.get("flip_seed") or 0),
        d.get("flip_by") or "pair",
    )
    return np.array(
        [
            is_flipped(unit_key(str(k), {"user_id": int(u), "caption": c}, by), seed, rate)
            for k, u, c in zip(keys, user_ids, captions)
        ],
        dtype=bool,
    )


class FinalMargins:
    """``margins(run_config, load_policy)``: {key, user_id, flipped, true_agrees, h} over the run's training
    pairs, h the mean over ``draws`` of d_ref - d_policy against the label trained on. The reference's
    pass is kept for every other run on the same shards."""

    def __init__(
        self,
        info: ModelInfo,
        device: torch.device,
        dtype: torch.dtype,
        draws: int,
        batch_size: int,
        seed: int,
    ):
        self.info, self.ctx = info, RunContext.local(device, dtype)
        self.draws, self.batch_size, self.seed = draws, batch_size, seed
        self._ref: dict[str, tuple[HeldOutDraws, list]] = {}

    def margins(self, run_config: dict, load_policy: Callable[[], torch.nn.Module]) -> dict[str, np.ndarray]:
        """``load_policy()`` gives the run's UNet on the device, called after the reference's pass
        (one UNet on the device at a time); dropped before returning."""
        key = str((run_config.get("data") or {}).get("shards"))
        if key not in self._ref:
            pairs = training_pairs(run_config, self.info, self.ctx, self.draws, self.batch_size, self.seed)
            ref = load_unet(self.info.path, self.ctx.dtype).to(self.ctx.device).eval()
            ref_d = pairs.d(ref)
            del ref
            free_device(self.ctx.device)
            self._ref[key] = (pairs, ref_d)
        pairs, ref_d = self._ref[key]
        unet = load_policy()
        h = implicit_margins({"policy": unet}, ref_d, pairs)["policy"].astype(np.float64)
        del unet
        free_device(self.ctx.device)
        keys, users = pairs.keys, pairs.column("user_id")
        flipped = trained_flips(run_config, keys, users, pairs.column("caption"))
        truth = pairs.column("true_agrees").astype(np.float64)
        return {
            "key": keys,
            "user_id": users.astype(float),
            "flipped": flipped,
            "true_agrees": np.where(np.isnan(truth), truth, np.where(flipped, 1.0 - truth, truth)),
            "h": np.where(flipped, -h, h),
        }
