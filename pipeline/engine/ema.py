"""EMA models kept in fp32 as rank shards, partitioned exactly like ZeRO-2's master weights.

Each rank owns, per EMA decay, the slice of the flat fp32 weights that ZeRO-2 gives it (1/world of
the trainable parameters), in CPU memory (``offload``, pinned when CUDA is present) or on the
accelerator. After each optimizer step a rank updates its shard from its own master slice, with no
communication: ``ema = decay * ema + (1 - decay) * theta``. For an EMA model's forward the shards are
all-gathered, in the compute dtype, into one reusable module whose parameters are views into flat
buffers, so a gather is the only copy. Each buffer remembers which model it holds until the next
update: with one buffer per EMA model (``ema.resident``, the default) every model is transferred and
all-gathered once per optimizer step, however many micro-steps use it (with one shared buffer, two
EMA models and grad_accum 8, it was 16 transfers and all-gathers); with ``buffers=2``
(``ema.overlap_gather``, for one shared buffer's memory plus one) the all-gather of the next EMA
model runs asynchronously while the current one (or the reference) runs its forward:
``prefetch(k)`` starts it, ``gather(k)`` waits for it. ``counts`` records the gathers and the bytes
copied host -> device (tests and benchmarks read it).

The update of offloaded shards (a ``lerp`` over this rank's fp32 slice in CPU memory, once per
optimizer step) can run in a background thread (``background``): the device -> host copy of the
master slice is queued on the GPU, the thread waits for it and updates the shards while the next
micro-steps run; anything that reads the shards (a gather, a checkpoint) waits for it first.

Checkpoints: one safetensors file per rank with every decay's shard; the loader re-cuts shards saved
at another world size (flat offsets do not depend on it), reading only the ranges it needs.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.engine.flat_layout import FlatLayout
from pipeline.errors import UserError


class ShardedEMA:
    """``staging``: copy the master slice once into a host staging buffer shared by every decay, then
    update each shard from it; None (default): where it pays, offloaded shards of a CUDA run (the
    buffers pinned, the copy asynchronous). True elsewhere runs the same path with plain CPU buffers
    (for tests: torch without an accelerator has no pinned memory allocator)."""

    def __init__(
        self,
        layout: FlatLayout,
        decays: list[float],
        offload: bool,
        device: torch.device,
        staging: bool | None = None,
        background: bool = False,
    ):
        self.layout = layout
        self.decays = list(decays)
        self.device = device
        self.offload = offload
        store = torch.device("cpu") if offload else device
        pin = offload and device.type == "cuda"
        stage = pin if staging is None else (staging and offload)
        parts = layout.local_partitions()
        # shards[k][g]: decay k, group g, this rank's fp32 slice; initialised to the starting weights
        self.shards = [[p.detach().float().to(store).clone() for p in parts] for _ in self.decays]
        if pin:
            self.shards = [[s.pin_memory() for s in row] for row in self.shards]
        if stage:
            self._staging = [torch.empty_like(s, pin_memory=pin) for s in self.shards[0]]
        else:
            self._staging = None
        self.module: torch.nn.Module | None = None
        # full flat buffers in the compute dtype; [0] made with the module, [1] on first prefetch
        self._bufs: list[list[torch.Tensor] | None] = []
        self._holds: list[int | None] = []  # which EMA model each buffer holds (None: stale)
        self._pending: dict[int, tuple[int, list, list]] = {}  # buffer -> (model, async works, sources)
        self.loaded: int | None = None  # which decay the module holds now
        self.counts: Counter[str] = Counter()  # gathers, h2d_bytes, updates
        # a background update needs a staged copy of the masters (the optimizer rewrites them in place)
        self._executor = (
            ThreadPoolExecutor(1, "ema-update") if background and self._staging is not None else None
        )
        self._update_done: Future | None = None

    def __len__(self) -> int:
        return len(self.decays)

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ema_k <- decay_k * ema_k + (1 - decay_k) * theta, on this rank's slice."""
        self._finish_pending()  # an all-gather in flight may still read the shards
        self.wait_update()  # the previous background update still reads the staging buffers
        parts = self.layout.local_partitions()
        ready = None
        if self._staging is not None:  # one device -> (pinned) host copy, shared by every decay
            for buf, theta in zip(self._staging, parts):
                buf.copy_(theta, non_blocking=True)
            if parts and parts[0].device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(parts[0].device))
            sources = self._staging
        else:
            sources = [t.detach().to(self.shards[0][g].device, torch.float32) for g, t in enumerate(parts)]

        def lerp() -> None:
            if ready is not None:
                ready.synchronize()  # the copy has landed; only this thread waits for it
            with torch.no_grad():
                for g, src in enumerate(sources):
                    for k, d in enumerate(self.decays):
                        self.shards[k][g].lerp_(src, 1.0 - d)

        self.invalidate()
        self.counts["updates"] += 1
        if self._executor is not None:
            self._update_done = self._executor.submit(lerp)
        else:
            lerp()

    def wait_update(self) -> None:
        """Block until a background update has written the shards (re-raising its error)."""
        if self._update_done is not None:
            done, self._update_done = self._update_done, None
            done.result()

    def invalidate(self) -> None:
        """Forget what the module and the buffers hold (the shards changed)."""
        self._finish_pending()
        self._holds = [None] * len(self._holds)
        self.loaded = None

    @property
    def buffers(self) -> int:
        return len(self._holds)

    def attach_module(self, module: torch.nn.Module, dtype: torch.dtype, buffers: int = 1) -> None:
        """The reusable module for EMA forwards (same architecture and parameter names as the policy).
        ``buffers=2``: a second full buffer, so that the next model's all-gather overlaps a forward."""
        module.requires_grad_(False).eval()
        first = self.layout.new_flats(dtype, self.device)
        self.layout.bind(module, first)
        n = max(1, min(buffers, len(self.decays)))
        self._bufs = [first]
        if all(self._direct(k) for k in range(len(self.decays))):
            n = 1  # the module points at the shards: no model is ever copied into a buffer
        self._bufs += [None] * (n - 1)
        self._holds = [None] * n
        self.module = module

    def _direct(self, k: int) -> bool:
        """One rank, shards already in the module's dtype and device: point at the shard, no copy."""
        return self.layout.world == 1 and all(
            s.dtype == f.dtype and s.device == f.device for s, f in zip(self.shards[k], self._bufs[0])
        )

    @torch.no_grad()
    def prefetch(self, k: int) -> None:
        """Start filling buffer ``k % buffers`` with EMA model k: an asynchronous all-gather with
        several ranks, overlapping whatever runs until ``gather(k)``. Every rank must call it in the
        same order. Call it only while the module is not running on that buffer (with 2 buffers the
        next model's buffer is never the current one)."""
        if self.module is None:
            raise RuntimeError("attach_module() first")
        b = k % len(self._bufs)
        if self._direct(k) or self._holds[b] == k or self._pending.get(b, (None,))[0] == k:
            return
        self._finish_pending(b)
        self.wait_update()
        self.counts["gathers"] += 1
        self.counts["h2d_bytes"] += sum(
            s.numel() * s.element_size()
            for s in self.shards[k]
            if s.device.type == "cpu" and self.device.type != "cpu"
        )
        if self._bufs[b] is None:
            self._bufs[b] = self.layout.new_flats(self._bufs[0][0].dtype, self.device)
        parts = [s.to(self.device, f.dtype, non_blocking=True) for s, f in zip(self.shards[k], self._bufs[b])]
        self._holds[b] = None
        if self.loaded is not None and not self._direct(self.loaded) and self.loaded % len(self._bufs) == b:
            self.loaded = None  # the module reads this buffer: it no longer holds that model
        self._pending[b] = (k, self.layout.gather_into(parts, self._bufs[b], async_op=True), parts)

    def _finish_pending(self, only: int | None = None) -> None:
        for b in [only] if only is not None else list(self._pending):
            if b in self._pending:
                k, works, _ = self._pending.pop(b)
                for work, _source in works:
                    work.wait()
                self._holds[b] = k

    @torch.no_grad()
    def gather(self, k: int) -> torch.nn.Module:
        """The reusable module holding EMA model k: the all-gather of every rank's shard (waiting for
        a ``prefetch(k)`` in flight, or done now). With one rank and shards already in the module's
        dtype and device, the module is pointed at the shard instead (no copy)."""
        if self.module is None:
            raise RuntimeError("attach_module() first")
        if self.loaded != k:
            if self._direct(k):
                self.wait_update()
                self.layout.point(self.module, self.shards[k])
            else:
                b = k % len(self._bufs)
                self.prefetch(k)  # no-op when it is in flight or already held
                self._finish_pending(b)
                self.layout.point(self.module, self._bufs[b])
            self.loaded = k
        return self.module

    @torch.no_grad()
    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: Path) -> None:
        self.wait_update()
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"decay{k}.group{g}": s.contiguous().cpu()
            for k, row in enumerate(self.shards)
            for g, s in enumerate(row)
        }
        meta = {
            "decays": json.dumps(self.decays),
            "world_size": str(self.layout.world),
            "rank": str(self.layout.rank),
            "partitions": json.dumps([g.partition for g in self.layout.groups]),
            "layout": json.dumps(self.layout.signature()),
        }
        save_file(tensors, str(folder / f"rank_{self.layout.rank:05d}.safetensors"), metadata=meta)

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        self.wait_update()
        files = sorted(folder.glob("rank_*.safetensors"))
        if not files:
            raise UserError(f"{folder}: no EMA shards in the checkpoint")
        with safe_open(str(files[0]), "pt") as f:
            meta = f.metadata()
        if json.loads(meta["decays"]) != self.decays:
            raise UserError(
                f"{folder}: EMA decays {meta['decays']} in the checkpoint, {self.decays} in the config"
            )
        if json.loads(meta["layout"]) != self.layout.signature():
            raise UserError(
                f"{folder}: the EMA shards were saved for other parameters (model or LoRA settings changed)"
            )
        old_world = int(meta["world_size"])
        old_parts = json.loads(meta["partitions"])
        if len(files) != old_world:
            raise UserError(
                f"{folder}: {len(files)} EMA shard files for a world of {old_world}: the checkpoint is incomplete"
            )
        for g, lay in enumerate(self.layout.groups):
            lo, hi = lay.partition * self.layout.rank, lay.partition * (self.layout.rank + 1)
            for k in range(len(self.decays)):
                dst = self.shards[k][g]
                dst.zero_()
                # copy [lo, hi) of the logical flat from the old shards that overlap it
                for r in range(old_world):
                    olo, ohi = old_parts[g] * r, old_parts[g] * (r + 1)
                    a, b = max(lo, olo), min(hi, ohi, lay.numel)
                    if a >= b:
                        continue
                    with safe_open(str(folder / f"rank_{r:05d}.safetensors"), "pt") as f:
                        piece = f.get_slice(f"decay{k}.group{g}")[a - olo : b - olo]
                    dst[a - lo : b - lo].copy_(piece)
        self.invalidate()
