"""The pair workload: encoded preference-pair shards (``stages.encode``) and ``PreferenceStep``
(``pipeline.train.pair_step``).

Data position: the micro-step counter alone, given the layout (shard counts, world size, data
workers, micro-batch; ``pipeline.data.loader``). A resume on another layout continues at the same
share of the epoch (the sample order differs from there on, with a warning).
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import numpy as np
import torch

from pipeline.data.annotator_weights import AnnotatorWeights
from pipeline.data.loader import Layout, PairStream, make_loader
from pipeline.data.shards import load_manifest, sha256_file
from pipeline.engine.context import RunContext
from pipeline.engine.dist import all_gather_object
from pipeline.errors import UserError
from pipeline.evaluate.preference import accuracy as preference_accuracy
from pipeline.minority import auroc
from pipeline.models import ModelInfo, inspect_model, load_scheduler
from pipeline.train.pair_step import PreferenceStep
from pipeline.train.workload import Models, Workload

log = logging.getLogger(__name__)


def check_shards(cfg, manifest: dict) -> ModelInfo:
    """The shards must come from the model being trained, at the configured resolution."""
    info = inspect_model(cfg.model.path or manifest["model"]["path"])
    if info.config_hash != manifest["model"]["config_hash"]:
        raise UserError(
            f"data.shards={cfg.data.shards} were encoded with {manifest['model']['path']} "
            f"(config hash {manifest['model']['config_hash'][:12]}), not with model.path={info.path} "
            f"({info.config_hash[:12]}): re-encode, or train the model the shards were made with"
        )
    if cfg.data.resolution is not None and cfg.data.resolution != manifest["resolution"]:
        raise UserError(
            f"data.resolution={cfg.data.resolution} but the shards are {manifest['resolution']} px"
        )
    if cfg.data.sample_latents and not manifest.get("store_std"):
        raise UserError("data.sample_latents=true needs shards encoded with output.store_std=true")
    return info


class PairWorkload(Workload):
    pair_fields = {"user_id": torch.int64, "flipped": torch.bool, "true_agrees": torch.float32}

    def __init__(self, cfg, objective):
        super().__init__(cfg, objective)
        self.manifest = load_manifest(cfg.data.shards)
        self.info = check_shards(cfg, self.manifest)
        shard_dir = Path(cfg.data.shards)
        self.paths = [shard_dir / s["name"] for s in self.manifest["shards"]]
        self.counts = [s["count"] for s in self.manifest["shards"]]
        listed = self.paths + [shard_dir / t["name"] for t in self.manifest["text_files"]]
        missing = [str(p) for p in listed if not p.is_file()]
        if missing:
            raise UserError(f"files listed in the manifest are missing: {', '.join(missing[:5])}")
        d = cfg.data
        self.annotator_weights = (
            AnnotatorWeights.from_file(d.annotator_weights) if d.annotator_weights else None
        )
        # (u, h, flipped) of the most recent pairs, for the AUROCs of u and -h against the flips
        self.window: deque = deque(maxlen=max(cfg.train.auroc_window, 0))

    def prepare(self, ctx: RunContext) -> None:
        super().prepare(ctx)
        cfg = self.cfg
        if cfg.data.verify_sha256:
            self._verify_shards(ctx)
        self.step_fn = PreferenceStep(
            self.objective,
            load_scheduler(self.info),
            self.info.prediction_type,
            ctx,
            cfg.train.seed,
            cfg.data.sample_latents,
            self.annotator_weights,
        )

    def _verify_shards(self, ctx: RunContext) -> None:
        """Every rank hashes its share of the shards; all ranks learn the mismatches and refuse together
        (a shard that differs from its manifest entry is not what was encoded: training on it would
        not be the run the manifest describes)."""
        mine = [
            s["name"]
            for i, s in enumerate(self.manifest["shards"] + self.manifest["text_files"])
            if i % ctx.world == ctx.rank
            and sha256_file(Path(self.cfg.data.shards) / s["name"]) != s["sha256"]
        ]
        bad = sorted(n for part in all_gather_object(mine) for n in part)
        if bad:
            more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
            raise UserError(
                f"data.verify_sha256: {len(bad)} file(s) in {self.cfg.data.shards} differ from the manifest: "
                f"{', '.join(bad[:8])}{more}; re-encode them (delete the shard-NNNNNN.json of each and run "
                "the same encode command), or train with data.verify_sha256=false to read them with damage "
                "handling"
            )

    def layout(self, world: int) -> Layout:
        d = self.cfg.data
        return Layout(tuple(self.counts), world, max(d.num_workers, 1), d.micro_batch)

    def batches(self, start: int):
        d, ctx = self.cfg.data, self.ctx
        stream = PairStream(
            self.paths,
            self.counts,
            self.manifest,
            ctx.rank,
            ctx.world,
            micro_batch=d.micro_batch,
            num_workers=d.num_workers,
            seed=d.seed,
            buffer=d.shuffle_buffer,
            flip_rate=d.flip_rate,
            flip_seed=d.flip_seed,
            flip_by=d.flip_by,
            start=start,
        )
        return iter(make_loader(stream, d.num_workers, pin_memory=ctx.device.type == "cuda"))

    def step(self, models: Models, batch: dict, micro_step: int):
        return self.step_fn(models.policy, models.reference, models.ema, batch, micro_step)

    def pairs_per_step(self, world: int) -> int:
        return self.cfg.data.micro_batch * self.cfg.train.grad_accum * world

    def data_state(self) -> dict:
        lay = self.layout(self.ctx.world)
        return {"world_size": lay.world, "workers": lay.workers, "micro_batch": lay.micro_batch}

    def resume_position(self, state: dict) -> int:
        micro_step = state["micro_step"]
        d = state.get("data") or {  # checkpoints written before the data state had its own entry
            "world_size": state["world_size"],
            "workers": state["data_workers"],
            "micro_batch": state["micro_batch"],
        }
        old = Layout(tuple(self.counts), d["world_size"], d["workers"], d["micro_batch"])
        new = self.layout(self.ctx.world)
        if old == new:
            return micro_step
        # another layout reads the data in another order: continue at the same share of the epoch
        pos = micro_step * old.world * old.micro_batch // (new.world * new.micro_batch)
        log.warning(
            "data layout changed (world %d->%d, workers %d->%d): the sample order differs from here on; "
            "resuming at micro-batch %d of this layout",
            old.world,
            new.world,
            old.workers,
            new.workers,
            pos,
        )
        return pos

    def records(self, batch: dict) -> dict[str, list]:
        return {
            "key": list(batch["keys"]),
            "user_id": batch["user_id"].tolist(),
            "flipped": batch["flipped"].tolist(),
            "true_agrees": batch["true_agrees"].tolist(),
        }

    def summary(self, cat: dict[str, np.ndarray]) -> dict[str, float]:
        """Statistics against the flipped labels and the recorded true preferences."""
        s: dict[str, float] = {}
        fl = cat["flipped"]
        if "W" in cat and fl.any() and (~fl).any():
            s["W_flipped"], s["W_clean"] = float(cat["W"][fl].mean()), float(cat["W"][~fl].mean())
        if "h" in cat and np.isfinite(cat["true_agrees"]).any():
            s["accuracy_true"] = preference_accuracy(cat["h"], cat["true_agrees"])
        if "u" not in cat and "h" not in cat:
            return s  # no score to rank pairs by (SFT): an AUROC would be a constant 0.5
        nan = np.full(len(fl), np.nan)
        self.window.extend(zip(cat.get("u", nan), cat.get("h", nan), fl))
        if self.window and len({f for _, _, f in self.window}) == 2:
            w = np.array(list(self.window), dtype=float)
            if np.isfinite(w[:, 0]).any():
                s["auroc_u_window"] = auroc(w[:, 0], w[:, 2] > 0.5)
            if np.isfinite(w[:, 1]).any():
                s["auroc_neg_h_window"] = auroc(-w[:, 1], w[:, 2] > 0.5)
        return s
