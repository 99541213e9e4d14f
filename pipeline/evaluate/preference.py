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
from tqdm import tqdm

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
    """Pairs as (batch, draw) inputs, identical for every model evaluated: ``d(model)`` gives each
    batch and draw's d_m = e_m(z_w) - e_m(z_l), [B] float32 on the CPU. Batch i's draw d is seeded by
    ``step_seed(seed, 0, i * batch_size * draws + d)``, whatever the rank.

    ``samples`` is a list of decoded samples (held-out pairs: collated once, kept in memory) or a
    callable returning a fresh iterable of them on every pass (a training set: streamed from its
    shards each pass, one batch in memory at a time). Pairs are read as labelled (no flips)."""

    def __init__(
        self,
        samples: list[dict] | Callable[[], Iterable[dict]],
        manifest: dict,
        scheduler,
        prediction_type: str,
        ctx: RunContext,
        draws: int = 4,
        batch_size: int = 16,
        seed: int = 1234,
        progress: str | None = None,
    ):
        self.progress = progress  # a streamed source's passes show a progress bar with this label
        self.n_pairs = sum(int(x["count"]) for x in manifest.get("shards", []))
        self.scheduler, self.prediction_type, self.ctx = scheduler, prediction_type, ctx
        self.resolution, self.sdxl = manifest["resolution"], manifest.get("pooled_dim") is not None
        self.draws, self.batch_size, self.seed = draws, batch_size, seed
        self._source = samples
        self._cached = None if callable(samples) else list(self._collated(samples))
        self._columns: dict[str, np.ndarray] | None = None
        if self._cached is not None:
            self._columns = self._gather(self._cached)

    def _collated(self, samples: Iterable[dict]) -> Iterable[dict]:
        chunk: list[dict] = []
        for s in samples:
            chunk.append(s)
            if len(chunk) == self.batch_size:
                yield self._collate(chunk)
                chunk = []
        if chunk:
            yield self._collate(chunk)

    def _collate(self, chunk: list[dict]) -> dict:
        batch = collate_pairs(chunk, [False] * len(chunk), self.resolution, self.sdxl)
        batch["caption"] = [s["meta"].get("caption") for s in chunk]
        return batch

    def batches(self) -> Iterable[dict]:
        """The collated batches, in order (streamed afresh for a callable source)."""
        return self._cached if self._cached is not None else self._collated(self._source())

    @torch.no_grad()
    def d(self, model: Callable) -> list[list[torch.Tensor]]:
        out, seen = [], []
        batches = self.batches()
        if self.progress and self._cached is None:
            total = -(-self.n_pairs // self.batch_size)
            batches = tqdm(batches, total=total, desc=self.progress, unit="batch", mininterval=10)
        for i, batch in enumerate(batches):
            row = []
            for d in range(self.draws):
                seed = step_seed(self.seed, 0, i * self.batch_size * self.draws + d)
                x = pair_inputs(
                    batch, self.scheduler, self.prediction_type, self.ctx.device, self.ctx.dtype, seed
                )
                row.append(diffusion_errors(run_unet(model, x), x).d.float().cpu())
            out.append(row)
            if self._cached is None:
                seen.append({k: batch[k] for k in ("keys", "user_id", "caption", "true_agrees")})
        if self._cached is None:
            self._columns = self._gather(seen)
        return out

    @staticmethod
    def _gather(batches: Iterable[dict]) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {"keys": [], "user_id": [], "caption": [], "true_agrees": []}
        for b in batches:
            cols["keys"] += list(b["keys"])
            cols["caption"] += list(b["caption"])
            for k in ("user_id", "true_agrees"):
                cols[k] += b[k].tolist()
        return {k: np.array(v, dtype=object if k == "caption" else None) for k, v in cols.items()}

    def column(self, name: str) -> np.ndarray:
        """Per pair, in order: ``keys``, ``user_id``, ``caption``, ``true_agrees`` (the label agrees
        with the recorded truth: 1/0, NaN unknown). A streamed source knows them after its first
        pass (``d``)."""
        if self._columns is None:
            raise RuntimeError("a streamed source knows its pairs after the first pass (d(model))")
        return self._columns[name]

    @property
    def keys(self) -> np.ndarray:
        return self.column("keys")


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
