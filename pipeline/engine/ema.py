"""EMA models kept in fp32 as rank shards, partitioned exactly like ZeRO-2's master weights.

Each rank owns, per EMA decay, the slice of the flat fp32 weights that ZeRO-2 gives it (1/world of
the trainable parameters), in CPU memory (``offload``, pinned when CUDA is present) or on the
accelerator. After each optimizer step a rank updates its shard from its own master slice, with no
communication: ``ema = decay * ema + (1 - decay) * theta``. For an EMA model's forward the shards are
all-gathered, in the compute dtype, into one reusable module whose parameters are views into flat
buffers, so a gather is the only copy.

Checkpoints: one safetensors file per rank with every decay's shard; the loader re-cuts shards saved
at another world size (flat offsets do not depend on it), reading only the ranges it needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.engine.flat_layout import FlatLayout
from pipeline.errors import UserError


class ShardedEMA:
    def __init__(self, layout: FlatLayout, decays: list[float], offload: bool, device: torch.device):
        self.layout = layout
        self.decays = list(decays)
        self.device = device
        self.offload = offload
        store = torch.device("cpu") if offload else device
        pin = offload and device.type == "cuda"
        parts = layout.local_partitions()
        # shards[k][g]: decay k, group g, this rank's fp32 slice; initialised to the starting weights
        self.shards = [[p.detach().float().to(store).clone() for p in parts] for _ in self.decays]
        if pin:
            self.shards = [[s.pin_memory() for s in row] for row in self.shards]
            self._staging = [torch.empty_like(s).pin_memory() for s in self.shards[0]]
        else:
            self._staging = None
        self.module: torch.nn.Module | None = None
        self._flats: list[torch.Tensor] | None = None
        self.loaded: int | None = None  # which decay the module holds now

    def __len__(self) -> int:
        return len(self.decays)

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ema_k <- decay_k * ema_k + (1 - decay_k) * theta, on this rank's slice."""
        for g, theta in enumerate(self.layout.local_partitions()):
            if self._staging is not None:  # one device -> pinned host copy, shared by every decay
                self._staging[g].copy_(theta, non_blocking=True)
                torch.cuda.current_stream().synchronize()
                src = self._staging[g]
            else:
                src = theta.detach().to(self.shards[0][g].device, torch.float32)
            for k, d in enumerate(self.decays):
                self.shards[k][g].lerp_(src, 1.0 - d)
        self.loaded = None

    def attach_module(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        """The reusable module for EMA forwards (same architecture and parameter names as the policy)."""
        module.requires_grad_(False).eval()
        self._flats = self.layout.new_flats(dtype, self.device)
        self.layout.bind(module, self._flats)
        self.module = module

    @torch.no_grad()
    def gather(self, k: int) -> torch.nn.Module:
        """Fill the reusable module with EMA model k (an all-gather of every rank's shard). With one
        rank and shards already in the module's dtype and device, the module is pointed at the shard
        instead (no copy)."""
        if self.module is None:
            raise RuntimeError("attach_module() first")
        if self.loaded != k:
            shards = self.shards[k]
            same = all(s.dtype == f.dtype and s.device == f.device for s, f in zip(shards, self._flats))
            if self.layout.world == 1 and same:
                self.layout.point(self.module, shards)
            else:
                self.layout.point(self.module, self._flats)
                parts = [s.to(self.device, f.dtype, non_blocking=True) for s, f in zip(shards, self._flats)]
                self.layout.gather_into(parts, self._flats)
            self.loaded = k
        return self.module

    @torch.no_grad()
    def full(self, k: int) -> list[torch.Tensor]:
        """EMA model k's full fp32 flat weights on the CPU (a collective: every rank must call it)."""
        flats = self.layout.new_flats(torch.float32, self.device)
        self.layout.gather_into([s.to(self.device) for s in self.shards[k]], flats)
        return [f.cpu() for f in flats]

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: Path) -> None:
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
        self.loaded = None
