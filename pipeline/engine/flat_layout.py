"""Where each trainable parameter lives in ZeRO-2's flat, rank-partitioned fp32 master weights.

Under ZeRO stage 1/2, DeepSpeed flattens each parameter group into one buffer (``bit16_groups_flat``,
padded at the end only) and gives rank r the slice ``[r * P, (r + 1) * P)`` of it as fp32 master
weights (``single_partition_of_fp32_groups``). Parameter offsets inside the flat buffer do not depend
on the world size (measured with DeepSpeed 0.19 on gloo), which is what lets EMA shards saved at one world size be
re-cut for another. This module reads that layout once and offers:

- ``local_partitions()``: this rank's fp32 master slices (views, no copy);
- ``gather_into(parts, flats)``: all-gather per-rank slices into full flat buffers;
- ``bind(module, flats)``: make a module's parameters views into such flat buffers (zero-copy loads);
- ``state_dict(flats)``: name -> tensor, for export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.engine import dist


@dataclass
class GroupLayout:
    names: list[str]  # parameter names, in flat order
    offsets: list[int]  # element offset of each parameter in the flat buffer
    shapes: list[torch.Size]
    numel: int  # unpadded elements (sum of parameter sizes)
    partition: int  # elements per rank (P)


class FlatLayout:
    def __init__(self, engine):
        opt = engine.optimizer
        if not hasattr(opt, "single_partition_of_fp32_groups"):
            raise RuntimeError(f"expected a ZeRO stage 1/2 optimizer, got {type(opt).__name__}")
        self.opt = opt
        self.world = dist.world_size()
        self.rank = dist.rank()
        names = {id(p): n for n, p in engine.module.named_parameters()}
        self.groups: list[GroupLayout] = []
        for g, params in enumerate(opt.bit16_groups):
            flat = opt.bit16_groups_flat[g]
            offs = [(p.data_ptr() - flat.data_ptr()) // p.element_size() for p in params]
            part = opt.single_partition_of_fp32_groups[g].numel()
            self.groups.append(
                GroupLayout(
                    names=[names[id(p)] for p in params],
                    offsets=offs,
                    shapes=[p.shape for p in params],
                    numel=sum(p.numel() for p in params),
                    partition=part,
                )
            )

    @property
    def padded(self) -> list[int]:
        return [g.partition * self.world for g in self.groups]

    def local_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 master weights, one flat slice per group (live views)."""
        return list(self.opt.single_partition_of_fp32_groups)

    def gather_into(
        self, parts: list[torch.Tensor], flats: list[torch.Tensor], async_op: bool = False
    ) -> list:
        """All-gather ``parts`` (this rank's slice of each group, any dtype and device: cast and moved
        to the buffer's) into ``flats`` (full padded buffers of P * world elements on the collective's
        device), one ``all_gather_into_tensor`` per group. ``async_op``: return the pending handles,
        ``(work, staged source)`` pairs to ``wait()`` on (holding the source alive until then)."""
        works = []
        for part, flat in zip(parts, flats):
            w = dist.all_gather_flat(flat, part, async_op=async_op)
            if w is not None:
                works.append(w)
        return works

    def new_flats(self, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        return [torch.zeros(n, dtype=dtype, device=device) for n in self.padded]

    def bind(self, module: torch.nn.Module, flats: list[torch.Tensor]) -> None:
        """Point ``module``'s trainable parameters (same names as the engine's) into ``flats``."""
        params = dict(module.named_parameters())
        for g, lay in zip(flats, self.groups):
            for name, off, shape in zip(lay.names, lay.offsets, lay.shapes):
                p = params[name]
                n = shape.numel()
                g[off : off + n].copy_(p.data.reshape(-1))
                p.data = g[off : off + n].view(shape)

    def point(self, module: torch.nn.Module, flats: list[torch.Tensor]) -> None:
        """Make ``module``'s trainable parameters views into ``flats`` without copying (the flats
        must be full buffers in the module's dtype and device)."""
        params = dict(module.named_parameters())
        for g, lay in zip(flats, self.groups):
            for name, off, shape in zip(lay.names, lay.offsets, lay.shapes):
                params[name].data = g[off : off + shape.numel()].view(shape)

    def state_dict(self, flats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for g, lay in zip(flats, self.groups):
            for name, off, shape in zip(lay.names, lay.offsets, lay.shapes):
                out[name] = g[off : off + shape.numel()].view(shape)
        return out

    def signature(self) -> list[dict]:
        """What must match for saved shards to be re-cut: names, offsets and sizes per group."""
        return [{"names": g.names, "offsets": g.offsets, "numel": g.numel} for g in self.groups]
