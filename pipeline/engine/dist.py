"""Distributed set-up that works the same under the deepspeed launcher, torchrun, SLURM and plain python."""

from __future__ import annotations

import os
import socket

import torch

from pipeline.dist_env import job_info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank).

    A plain ``python -m stages.train`` has no launcher: it becomes a world of one on a free port
    (DeepSpeed would otherwise try MPI discovery and fail). On the CPU the shared-memory allreduce op
    (a ~26 s JIT build) is disabled: gloo is used as is.
    """
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:  # srun without torchrun, or no launcher at all: one parser for both
        job = job_info()
        os.environ.update(RANK=str(job.rank), WORLD_SIZE=str(job.world_size), LOCAL_RANK=str(job.local_rank))
        if job.world_size == 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def all_reduce_max(x: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([float(x)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
