"""Who am I in a job array: rank / world size / local rank from the launcher's environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

SLURM_SOURCE = "SLURM_PROCID/SLURM_NTASKS"


@dataclass(frozen=True)
class JobInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str  # where the numbers came from, for the log


def job_info(
    rank: int | None = None, world_size: int | None = None, env: dict[str, str] | None = None
) -> JobInfo:
    """Explicit values win; then torchrun/deepspeed (RANK, WORLD_SIZE, LOCAL_RANK); then SLURM; else 0 of 1."""
    env = dict(os.environ) if env is None else env
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both dist.rank and dist.world_size, or neither")
        r, w, src = rank, world_size, "config"
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    elif "RANK" in env and "WORLD_SIZE" in env:
        r, w, src = int(env["RANK"]), int(env["WORLD_SIZE"]), "RANK/WORLD_SIZE"
        local = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        r, w, src = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), SLURM_SOURCE
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        r, w, src, local = 0, 1, "default (single job)", 0
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank {r} is not in [0, world_size={w}) (from {src})")
    return JobInfo(rank=r, world_size=w, local_rank=local, source=src)
