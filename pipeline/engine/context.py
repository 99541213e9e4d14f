"""Who and where this process runs: made once, after the process group exists, and passed as one object.

The trainer (``stages.train``) makes it after ``init_distributed``, ``check_precision`` and
``resolve_attention``; the model builders, the export, the checkpoints, the workloads and the pair step
read what they need from it. A one-process caller (evaluation, a benchmark) makes ``RunContext.local``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RunContext:
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype  # compute dtype of the models (train.precision)
    attention: str  # the resolved attention backend: sdpa | xformers (pipeline.engine.precision)

    @classmethod
    def local(cls, device: torch.device, dtype: torch.dtype = torch.float32) -> RunContext:
        """One process (rank 0 of 1) with UNets as loaded (diffusers' default attention is PyTorch SDPA)."""
        return cls(rank=0, world=1, device=device, dtype=dtype, attention="sdpa")
