"""The implicit preference classifier of a trained UNet against the reference, on held-out pairs.

For every pair and every draw d = 1..D, one timestep and one noise (shared by winner and loser, and
identical for every model evaluated: seeded by (seed, batch, draw)) give h_m = d_ref - d_m as in
training, from the training step's own inputs and errors (``pipeline.losses.diffusion``). The
classifier's margin is the mean of h_m over the draws; it prefers the labelled winner when the margin
is > 0. Accuracy counts ties as one half.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from pipeline.data.loader import collate_pairs
from pipeline.data.shards import decode_sample, iter_tar_samples, load_manifest
from pipeline.data.text_store import TextStore
from pipeline.engine.context import RunContext
from pipeline.losses.diffusion import diffusion_errors, pair_inputs, run_unet, step_seed


def iter_pairs(shard_dir: str | Path, max_pairs: int | None = None) -> Iterable[dict]:
    """Decoded samples of a shard directory, in manifest order (no shuffling, no flips)."""
    m = load_manifest(shard_dir)
    texts = TextStore(shard_dir, m)
    n = 0
    for s in m["shards"]:
        for raw in iter_tar_samples(Path(shard_dir) / s["name"]):
            if max_pairs is not None and n >= max_pairs:
                return
            yield decode_sample(raw, texts)
            n += 1


class HeldOutDraws:
    """The held-out pairs as (batch, draw) inputs, identical for every model evaluated: ``d(model)``
    gives each batch and draw's d_m = e_m(z_w) - e_m(z_l), [B] float32 on the CPU. Batch i's draw d
    is seeded by ``step_seed(seed, 0, i * batch_size * draws + d)``, whatever the rank."""

    def __init__(
        self,
        samples: list[dict],
        manifest: dict,
        scheduler,
        prediction_type: str,
        ctx: RunContext,
        draws: int = 4,
        batch_size: int = 16,
        seed: int = 1234,
    ):
        self.scheduler, self.prediction_type, self.ctx = scheduler, prediction_type, ctx
        sdxl = manifest.get("pooled_dim") is not None
        self.batches = []
        for bi in range(0, len(samples), batch_size):
            chunk = samples[bi : bi + batch_size]
            self.batches.append(collate_pairs(chunk, [False] * len(chunk), manifest["resolution"], sdxl))
        self.draws, self.batch_size, self.seed = draws, batch_size, seed

    @torch.no_grad()
    def d(self, model: Callable) -> list[list[torch.Tensor]]:
        out = []
        for i, batch in enumerate(self.batches):
            row = []
            for d in range(self.draws):
                seed = step_seed(self.seed, 0, i * self.batch_size * self.draws + d)
                x = pair_inputs(
                    batch, self.scheduler, self.prediction_type, self.ctx.device, self.ctx.dtype, seed
                )
                row.append(diffusion_errors(run_unet(model, x), x).d.cpu())
            out.append(row)
        return out

    @property
    def keys(self) -> np.ndarray:
        return np.array([k for b in self.batches for k in b["keys"]])


def implicit_margins(
    models: dict[str, Callable], reference: Callable | list, pairs: HeldOutDraws
) -> dict[str, np.ndarray]:
    """Per-pair mean h over the draws for each model in ``models``: {name: [N]}, plus "keys".

    One model runs at a time: the reference first (or ``reference`` is ``pairs.d(reference_unet)``,
    computed once for many calls), then each model in turn, so a caller can keep a single UNet on the
    GPU (SDXL in fp16: 5 GiB each)."""
    ref = reference if isinstance(reference, list) else pairs.d(reference)
    res = {}
    for name, model in models.items():
        per_batch = []
        for ref_row, row in zip(ref, pairs.d(model)):
            acc = torch.zeros_like(row[0])
            for ref_d, d in zip(ref_row, row):
                acc += ref_d - d
            per_batch.append((acc / pairs.draws).numpy())
        res[name] = np.concatenate(per_batch) if per_batch else np.zeros(0, dtype=np.float32)
    res["keys"] = pairs.keys
    return res


def accuracy(margin: np.ndarray, label_agrees: np.ndarray | None = None) -> float:
    """Share of pairs whose margin prefers the labelled winner (ties 1/2); with ``label_agrees``
    (1 where the label agrees with the truth, 0 where not), the share that prefers the true winner."""
    m = np.asarray(margin, dtype=float)
    right = (m > 0) + 0.5 * (m == 0)
    if label_agrees is None:
        return float(right.mean())
    a = np.asarray(label_agrees, dtype=float)
    ok = np.isfinite(a)
    return float(np.where(a[ok] > 0.5, right[ok], 1.0 - right[ok]).mean())
