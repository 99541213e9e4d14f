"""The training data stream: webdataset shards -> batches of [2B, ...] (winners then losers), with an
order that is a pure function of (seed, epoch, layout) so a resumed run continues exactly.

The order, for epoch e, with R ranks, K data workers per rank, B pairs per micro-batch:
1. the shards are permuted by a seeded RNG of (seed, e) and their samples concatenated;
2. the concatenation is cut into R * K contiguous units of L = floor(N / (R K B)) * B samples
   (the remainder, fewer than R K B pairs, waits for the next epoch's permutation); unit q = r K + k
   belongs to worker k of rank r, so a rank reads only its own stretch of shards;
3. each unit is shuffled by a seeded buffer (size ``shuffle_buffer``), simulated on sample indices:
   the emitted order is known without reading any data;
4. worker k's i-th batch is the i-th B samples of its unit; PyTorch's DataLoader takes batches from
   its workers in turn, so the rank's micro-batch m comes from worker m mod K.

Every pair of an epoch is therefore seen exactly once across ranks and workers (less that remainder),
and the position in the data is the micro-batch counter alone. Resuming at micro-batch m recomputes
the orders and reads, per worker, only from the shard that holds the first still-needed sample: no
replay of the stream. A truncated or corrupt shard is skipped with a warning; its missing samples are
replaced by the worker's most recent sample (counted in the batch's ``substituted``), so every rank
still yields the same number of batches and no collective hangs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.flips import is_flipped, unit_key
from pipeline.data.shards import decode_sample, iter_tar_samples, label_agrees_with_truth
from pipeline.data.text_store import TextStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    counts: tuple[int, ...]  # samples per shard (manifest order)
    world: int
    workers: int  # logical workers per rank (1 when num_workers == 0)
    micro_batch: int

    @property
    def unit_len(self) -> int:
        n = sum(self.counts)
        return (n // (self.world * self.workers * self.micro_batch)) * self.micro_batch

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per rank per epoch."""
        return self.unit_len // self.micro_batch * self.workers


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n_shards)


def buffer_shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``buffer`` slots emits a stream 0..n-1: each incoming
    item replaces a random slot whose occupant is emitted; the rest is emitted shuffled at the end.
    An item is emitted at most ``buffer - 1`` places before it arrives, so reading stays bounded."""
    out = np.empty(n, dtype=np.int64)
    buf: list[int] = []
    j = 0
    picks = rng.integers(0, buffer, size=max(n - buffer, 0))
    for i in range(n):
        if len(buf) < buffer:
            buf.append(i)
            continue
        slot = picks[i - buffer]
        out[j] = buf[slot]
        j += 1
        buf[slot] = i
    tail = np.array(buf, dtype=np.int64)
    rng.shuffle(tail)
    out[j:] = tail
    return out


def unit_order(layout: Layout, seed: int, buffer: int, epoch: int, unit: int) -> np.ndarray:
    """Positions (in the epoch's concatenated stream) of unit ``unit``'s samples, in emission order."""
    rng = np.random.default_rng([seed, epoch, unit, 0xB0F])
    base = unit * layout.unit_len
    return base + buffer_shuffle_order(layout.unit_len, buffer, rng)


class _UnitReader:
    """Reads the samples of a set of stream positions from the epoch's shard sequence, sequentially,
    starting at the shard that holds the smallest one; decodes only the positions asked for."""

    def __init__(
        self, paths: list[Path], counts: tuple[int, ...], order: np.ndarray, wanted: np.ndarray, decode
    ):
        self.paths, self.decode = paths, decode
        starts = np.concatenate([[0], np.cumsum([counts[i] for i in order])])
        self.order, self.starts = order, starts
        self.wanted = set(int(x) for x in wanted)
        self.pos_shard = (
            int(np.searchsorted(starts, int(wanted.min()), side="right") - 1) if len(wanted) else len(order)
        )
        self.pending: dict[int, dict] = {}
        self.missing: set[int] = set()
        self._it = None
        self._pos = None
        self.corrupt_shards: list[str] = []

    def _next_shard(self) -> bool:
        if self.pos_shard >= len(self.order):
            return False
        s = int(self.order[self.pos_shard])
        self._it = iter_tar_samples(self.paths[s])
        self._pos = int(self.starts[self.pos_shard])
        self._end = int(self.starts[self.pos_shard + 1])
        self._name = self.paths[s].name
        self.pos_shard += 1
        return True

    def fetch(self, p: int) -> dict | None:
        """The decoded sample at position p, or None if it cannot be read (corrupt shard / sample)."""
        while p not in self.pending and p not in self.missing:
            if self._it is None and not self._next_shard():
                return None
            try:
                raw = next(self._it)
            except StopIteration:
                raw = None
            except Exception as e:  # noqa: BLE001 - tar/stream errors of a damaged shard
                log.warning(
                    "shard %s is damaged after sample %d: %s; skipping the rest of it",
                    self._name,
                    self._pos - self.starts[self.pos_shard - 1],
                    e,
                )
                self.corrupt_shards.append(self._name)
                raw = None
            if raw is None:  # end of this shard: whatever it should still have held is missing
                if self._pos < self._end:
                    if self._name not in self.corrupt_shards:
                        log.warning("shard %s ended %d samples early", self._name, self._end - self._pos)
                        self.corrupt_shards.append(self._name)
                    self.missing.update(range(self._pos, self._end))
                self._it = None
                continue
            pos = self._pos
            self._pos += 1
            if pos in self.wanted:
                try:
                    self.pending[pos] = self.decode(raw)
                except Exception as e:  # noqa: BLE001
                    log.warning(
                        "shard %s: sample %s unreadable (%s); substituting", self._name, raw.get("__key__"), e
                    )
                    self.missing.add(pos)
        if p in self.missing:
            return None
        self.wanted.discard(p)
        return self.pending.pop(p)


class PairStream(IterableDataset):
    """Yields collated micro-batches for one rank, from micro-batch ``start`` on (forever, epoch after
    epoch). Batch fields: ``latents`` [2B, C, h, w] (winners then losers; flipped pairs swapped),
    ``std`` (same, if present), ``text`` [B, 77, D], ``pooled`` [B, P] (SDXL), ``time_ids`` [2B, 6]
    (SDXL), ``flipped`` [B] bool, ``true_agrees`` [B] float (1/0 when the source recorded a true
    preference, else NaN), ``user_id`` [B] int64, ``keys`` list[str], ``micro_step`` int,
    ``epoch`` int, ``substituted`` int."""

    def __init__(
        self,
        paths: list[Path],
        counts: list[int],
        manifest: dict,
        rank: int,
        world: int,
        micro_batch: int,
        num_workers: int,
        seed: int,
        buffer: int,
        flip_rate: float = 0.0,
        flip_seed: int = 0,
        flip_by: str = "pair",
        start: int = 0,
    ):
        self.paths = list(paths)
        self.layout = Layout(tuple(counts), world, max(num_workers, 1), micro_batch)
        if self.layout.unit_len == 0:
            need = world * self.layout.workers * micro_batch
            raise ValueError(
                f"{sum(counts)} pairs cannot fill one batch per worker ({world} ranks x {self.layout.workers} workers x {micro_batch})= {need}"
            )
        self.rank, self.seed, self.buffer = rank, seed, buffer
        self.flip = (flip_rate, flip_seed, flip_by)
        self.start = start
        self.resolution = manifest["resolution"]
        self.latent_shape = tuple(manifest["latent_shape"])
        self.text_shape = tuple(manifest["text_shape"])
        self.pooled_dim = manifest.get("pooled_dim")
        self.texts = TextStore(self.paths[0].parent, manifest) if self.paths else None
        self.latent_dtype = {"fp16": np.float16, "fp32": np.float32}[manifest["dtypes"]["latents"]]
        self.store_std = bool(manifest.get("store_std"))

    def _decode(self, raw: dict) -> dict:
        return self._check(decode_sample(raw, self.texts))

    def _check(self, s: dict) -> dict:
        """Refuse (so the reader substitutes and counts) a sample whose arrays or meta would break the
        collate or the step: every array the manifest promises, with its shape and dtype."""
        want = {
            "lat_w": (self.latent_shape, self.latent_dtype),
            "lat_l": (self.latent_shape, self.latent_dtype),
        }
        want["txt"] = (self.text_shape, np.float16)
        if self.pooled_dim is not None:
            want["pooled"] = ((self.pooled_dim,), np.float16)
        if self.store_std:
            want["std_w"] = want["std_l"] = (self.latent_shape, self.latent_dtype)
        for name, (shape, dtype) in want.items():
            a = s.get(name)
            if a is None:
                raise ValueError(f"no {name}.npy member")
            if tuple(a.shape) != shape or a.dtype != dtype:
                raise ValueError(
                    f"{name}.npy is {a.dtype} {list(a.shape)}, the manifest says {np.dtype(dtype)} {list(shape)}"
                )
        meta = s["meta"]
        if (
            not isinstance(meta, dict)
            or meta.get("winner") not in (0, 1)
            or not isinstance(meta.get("user_id"), int)
        ):
            raise ValueError("json member lacks an integer user_id or a winner of 0 or 1")
        return s

    def _flipped(self, s: dict) -> bool:
        rate, seed, by = self.flip
        return is_flipped(unit_key(s["__key__"], s["meta"], by), seed, rate)

    def _collate(self, samples: list[dict], m: int, epoch: int, substituted: int) -> dict:
        flips = [self._flipped(s) for s in samples]
        batch = collate_pairs(samples, flips, self.resolution, self.pooled_dim is not None)
        batch.update(micro_step=m, epoch=epoch, substituted=substituted)
        return batch

    def batches(self, phys_worker: int, n_phys: int):
        """Micro-batches m = start + phys_worker, start + phys_worker + n_phys, ... for this worker."""
        lay = self.layout
        spe = lay.steps_per_epoch
        reader, cur_epoch, last = None, None, None
        for m in count(self.start + phys_worker, n_phys):
            epoch, j = divmod(m, spe)
            k, i = j % lay.workers, j // lay.workers  # logical worker, its batch index
            unit = self.rank * lay.workers + k
            if epoch != cur_epoch:
                order = shard_order(len(self.paths), self.seed, epoch)
                uorder = unit_order(lay, self.seed, self.buffer, epoch, unit)
                reader = _UnitReader(
                    self.paths, lay.counts, order, uorder[i * lay.micro_batch :], self._decode
                )
                cur_epoch = epoch
            samples, substituted = [], 0
            for p in uorder[i * lay.micro_batch : (i + 1) * lay.micro_batch]:
                s = reader.fetch(int(p))
                if s is None:
                    substituted += 1
                    s = last
                    if s is None:  # nothing read yet: borrow the next readable sample of the unit
                        for q in uorder[(i + 1) * lay.micro_batch :]:
                            s = reader.fetch(int(q))
                            if s is not None:
                                reader.pending[int(q)] = s  # it still comes at its own turn
                                reader.wanted.add(int(q))
                                break
                        if s is None:
                            raise RuntimeError(
                                f"rank {self.rank}: no readable sample in data unit {unit} of epoch {epoch}"
                            )
                samples.append(s)
                last = s
            yield self._collate(samples, m, epoch, substituted)

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            return self.batches(0, 1)
        return self.batches(info.id, info.num_workers)


def _time_ids(meta: dict, side: str, resolution: int) -> list[float]:
    """SDXL micro-conditioning of one image: original (h, w), crop (top, left), target (h, w)."""
    return [*meta[f"original_size_{side}"], *meta[f"crop_top_left_{side}"], resolution, resolution]


def collate_pairs(samples: list[dict], flips: list[bool], resolution: int, sdxl: bool) -> dict:
    """Decoded samples -> one batch, winners then losers; a flipped pair trains on the swapped label."""
    w = [s["lat_l"] if f else s["lat_w"] for s, f in zip(samples, flips)]
    lo = [s["lat_w"] if f else s["lat_l"] for s, f in zip(samples, flips)]
    batch = {
        "latents": torch.from_numpy(np.stack(w + lo)),
        "text": torch.from_numpy(np.stack([s["txt"] for s in samples])),
        "flipped": torch.tensor(flips, dtype=torch.bool),
        "user_id": torch.tensor([int(s["meta"]["user_id"]) for s in samples], dtype=torch.int64),
        "keys": [s["__key__"] for s in samples],
    }
    truth = []
    for s, f in zip(samples, flips):  # does the label trained on (after a flip) agree with the truth?
        t = label_agrees_with_truth(s["meta"])
        truth.append(t if np.isnan(t) else float(bool(t) != f))
    batch["true_agrees"] = torch.tensor(truth, dtype=torch.float32)
    if "std_w" in samples[0]:
        sw = [s["std_l"] if f else s["std_w"] for s, f in zip(samples, flips)]
        sl = [s["std_w"] if f else s["std_l"] for s, f in zip(samples, flips)]
        batch["std"] = torch.from_numpy(np.stack(sw + sl))
    if sdxl:
        batch["pooled"] = torch.from_numpy(np.stack([s["pooled"] for s in samples]))
        ids_w = [_time_ids(s["meta"], "l" if f else "w", resolution) for s, f in zip(samples, flips)]
        ids_l = [_time_ids(s["meta"], "w" if f else "l", resolution) for s, f in zip(samples, flips)]
        batch["time_ids"] = torch.tensor(ids_w + ids_l, dtype=torch.float32)
    return batch


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers ignore SIGTERM/SIGINT: a scheduler signals the whole process group, and the rank must
    still get its next batches while it writes its final checkpoint (workers end with the rank)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(stream: PairStream, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Worker i serves micro-batches m with m = start + i (mod num_workers): the DataLoader's
    round-robin over workers then returns them in order m = start, start + 1, ..."""
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        in_order=True,
        worker_init_fn=_ignore_stop_signals if num_workers else None,
    )
