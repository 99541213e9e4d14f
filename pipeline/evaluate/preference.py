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


def implicit_margins(
    models: dict[str, Callable],
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
) -> dict[str, np.ndarray]:
    """Per-pair mean h over ``draws`` for each model in ``models``: {name: [N]}, plus "keys"."""
    step = PreferenceStep(_Probe(ObjectiveConfig()), scheduler, prediction_type, dtype, device, seed, rank=0)
    sdxl = manifest.get("pooled_dim") is not None
    out = {name: [] for name in models}
    keys = []
    with torch.no_grad():
        for bi in range(0, len(samples), batch_size):
            chunk = samples[bi : bi + batch_size]
            batch = collate_pairs(chunk, [False] * len(chunk), manifest["resolution"], sdxl)
            keys += batch["keys"]
            acc = {name: torch.zeros(len(chunk)) for name in models}
            for d in range(draws):
                x = step.inputs(batch, micro_step=bi * draws + d)
                ref_d = step.errors(run_unet(reference, x), x).d
                for name, model in models.items():
                    acc[name] += (ref_d - step.errors(run_unet(model, x), x).d).cpu()
            for name in models:
                out[name].append((acc[name] / draws).numpy())
    res = {name: np.concatenate(v) for name, v in out.items()}
    res["keys"] = np.array(keys)
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
