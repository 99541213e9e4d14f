"""The implicit preference classifier of a trained UNet against the reference, on held-out pairs.

For every pair and every draw d = 1..D, one timestep and one noise (shared by winner and loser, and
identical for every model evaluated: seeded by (seed, batch, draw)) give h_m = d_ref - d_m as in
training. The classifier's margin is the mean of h_m over the draws; it prefers the labelled winner
when the margin is > 0. Accuracy counts ties as one half.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from pipeline.data.loader import collate_pairs
from pipeline.data.shards import decode_sample, iter_tar_samples, load_manifest
from pipeline.data.text_store import TextStore
from pipeline.losses.objectives import Objective
from pipeline.schema.objective import ObjectiveConfig
from pipeline.step import PreferenceStep, run_unet


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


class _Probe(Objective):
    """Marks every model as needed so PreferenceStep.inputs/errors behave as in DPO training."""


class _Draws:
    """The held-out pairs as (batch, draw) inputs, identical for every model: ``d(model)`` gives each
    batch and draw's d_m = e_m(z_w) - e_m(z_l), [B] float32 on the CPU."""

    def __init__(self, samples, manifest, scheduler, prediction_type, device, dtype, draws, batch_size, seed):
        self.step = PreferenceStep(
            _Probe(ObjectiveConfig()), scheduler, prediction_type, dtype, device, seed, rank=0
        )
        sdxl = manifest.get("pooled_dim") is not None
        self.batches = [
            collate_pairs(samples[bi : bi + batch_size], [False] * len(samples[bi : bi + batch_size]),
                          manifest["resolution"], sdxl)
            for bi in range(0, len(samples), batch_size)
        ]  # fmt: skip
        self.draws, self.batch_size = draws, batch_size

    @torch.no_grad()
    def d(self, model: Callable) -> list[list[torch.Tensor]]:
        out = []
        for i, batch in enumerate(self.batches):
            row = []
            for d in range(self.draws):
                x = self.step.inputs(batch, micro_step=i * self.batch_size * self.draws + d)
                row.append(self.step.errors(run_unet(model, x), x).d.cpu())
            out.append(row)
        return out

    @property
    def keys(self) -> np.ndarray:
        return np.array([k for b in self.batches for k in b["keys"]])


def implicit_margins(
    models: dict[str, Callable],
    reference: Callable | list,
    samples: list[dict],
    manifest: dict,
    scheduler,
    prediction_type: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    draws: int = 4,
    batch_size: int = 16,
    seed: int = 1234,
) -> dict[str, np.ndarray]:
    """Per-pair mean h over ``draws`` for each model in ``models``: {name: [N]}, plus "keys".

    One model runs at a time: the reference first (or ``reference`` is its result from
    ``reference_errors``, computed once for many calls), then each model in turn, so a caller can keep
    a single UNet on the GPU (SDXL in fp16: 5 GiB each)."""
    pairs = _Draws(samples, manifest, scheduler, prediction_type, device, dtype, draws, batch_size, seed)
    ref = reference if isinstance(reference, list) else pairs.d(reference)
    res = {}
    for name, model in models.items():
        per_batch = []
        for ref_row, row in zip(ref, pairs.d(model)):
            acc = torch.zeros_like(row[0])
            for ref_d, d in zip(ref_row, row):
                acc += ref_d - d
            per_batch.append((acc / draws).numpy())
        res[name] = np.concatenate(per_batch) if per_batch else np.zeros(0, dtype=np.float32)
    res["keys"] = pairs.keys
    return res


def reference_errors(
    reference: Callable,
    samples: list[dict],
    manifest: dict,
    scheduler,
    prediction_type: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    draws: int = 4,
    batch_size: int = 16,
    seed: int = 1234,
) -> list:
    """The reference's d per batch and draw, for ``implicit_margins`` called once per model (the same
    arguments must follow)."""
    return _Draws(samples, manifest, scheduler, prediction_type, device, dtype, draws, batch_size, seed).d(
        reference
    )


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
