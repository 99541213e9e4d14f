"""The one door to ``torch.distributed``: the launch environment, the process group, and every collective.

Every collective of ``pipeline/`` and ``stages/`` goes through the helpers below (a test reads the
source and fails on one called elsewhere). They put each tensor on the collective's device (the
current CUDA device for NCCL, which takes nothing else; the CPU for gloo) and bring the result back to
the caller's device, so the same call works in the CPU tests on gloo and on 8 GPUs over NCCL. With no
process group, or a world of one, they do no communication at all.

Flat buffers go through ``all_gather_into_tensor`` (no whole-output temporary inside NCCL, unlike the
list form of ``all_gather``).

The launch environment (``resolve_launch``) is read the same way under the deepspeed launcher, torchrun,
``srun`` without either, and a plain ``python -m``: what it cannot resolve (a multi-node srun with no
master address, a LOCAL_RANK beyond the visible GPUs) is refused with a message, not guessed.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.dist_env import SLURM_SOURCE, job_info
from pipeline.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- the launch environment


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order: ``"gpu[01-03,07],login1"`` ->
    ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]`` (zero padding kept). Raises ValueError on a form
    it does not know (then set MASTER_ADDR yourself)."""
    pieces, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            pieces.append(cur)
            cur = ""
        else:
            cur += ch
    pieces.append(cur)
    hosts: list[str] = []
    for piece in pieces:
        m = re.fullmatch(r"([^\[\],]+)(?:\[([0-9,\-]+)\])?", piece)
        if m is None:
            raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # which launcher's variables were read, for messages

    def env(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def resolve_launch(env: dict[str, str] | None = None) -> Launch:
    """Rank, world, local rank and rendezvous of this process.

    - torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT as set.
    - ``srun`` alone: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR (if not set) is the first
      host of the step's node list, MASTER_PORT (if not set) 15000 + the job id mod 20000, so every
      task of the job finds the same one.
    - nothing: a world of one on a free loopback port.
    """
    env = dict(os.environ) if env is None else env
    try:
        job = job_info(env=env)  # the job-array parser: RANK/WORLD_SIZE, then SLURM, else 0 of 1
    except ValueError as e:
        raise UserError(str(e)) from None
    rank, world, local, source = job.rank, job.world_size, job.local_rank, job.source
    srun = source == SLURM_SOURCE
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if world == 1:
        return Launch(rank, 1, local, addr or "127.0.0.1", int(port) if port else free_port(), source)
    if addr is None:
        if not srun:
            raise UserError(
                f"{source} says a world of {world} but MASTER_ADDR is not set: launch with "
                "torchrun or deepspeed, or set MASTER_ADDR and MASTER_PORT"
            )
        nodes = int(
            env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        )
        nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST"))
        if nodes <= 1:
            addr = "127.0.0.1"
        elif nodelist:
            try:
                addr = expand_nodelist(nodelist)[0]
            except ValueError as e:
                raise UserError(f"{e}: set MASTER_ADDR to the first node's address") from None
        else:
            raise UserError(
                f"srun over {nodes} nodes without SLURM_STEP_NODELIST or MASTER_ADDR: "
                "set MASTER_ADDR to the first node's address"
            )
    if port is None:
        job = env.get("SLURM_JOB_ID")
        if job is None or not job.isdigit():
            raise UserError(f"a world of {world} without MASTER_PORT: set it (the same on every rank)")
        port = str(15000 + int(job) % 20000)
    return Launch(rank, world, local, addr, int(port), source)


def device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a rank: its local rank, or 0 when the launcher shows each task one GPU
    (``srun --gpus-per-task=1``: every task's LOCAL_RANK may be 0..7 while it sees a single device).
    More local ranks than visible GPUs otherwise is refused (two ranks on one GPU: NCCL fails later
    with "Duplicate GPU detected")."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise UserError(
            f"local rank {local_rank} but {visible} GPUs are visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one rank per GPU"
        )
    return local_rank


def ranks_per_node(env: dict[str, str] | None = None) -> int:
    """Processes of this job on this node: LOCAL_WORLD_SIZE (torchrun, the deepspeed launcher), else
    SLURM's tasks per node, else the visible GPUs."""
    env = dict(os.environ) if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        m = re.match(r"\d+", env.get(key, ""))
        if m:
            return max(1, int(m.group()))
    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)


def rank_threads(env: dict[str, str] | None = None) -> int:
    """CPU threads of this rank: its share of the node's cores, unless OMP_NUM_THREADS says otherwise.
    The deepspeed launcher sets none, so 8 ranks would each start a pool of every core for the CPU work
    of a step (the EMA update of offloaded shards, the data path): 8x oversubscribed. Returns the count."""
    env = dict(os.environ) if env is None else env
    if "OMP_NUM_THREADS" in env:
        return torch.get_num_threads()
    n = max(1, (os.cpu_count() or 1) // ranks_per_node(env))
    torch.set_num_threads(n)
    return n


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str


def init_distributed(device: str = "auto", timeout_min: float = 30.0) -> DistInfo:
    """Resolve the launch, pick this rank's device, start the process group (through DeepSpeed, with
    the given collective timeout instead of its hidden 10-minute default) and return who we are.

    ``device``: auto | cpu | cuda. On CUDA, LOCAL_RANK is rewritten to the device index actually
    used: DeepSpeed's engine sets the device from it. On the CPU the shared-memory allreduce op (a
    ~26 s JIT build) is disabled: gloo is used as is."""
    import deepspeed

    launch = resolve_launch()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is visible; use device=cpu or auto")
        idx = device_index(launch.local_rank, torch.cuda.device_count())
        dev = torch.device("cuda", idx)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, idx, backend = torch.device(device), launch.local_rank, "gloo"
    os.environ.update(launch.env() | {"LOCAL_RANK": str(idx)})
    if backend == "nccl":
        rank_threads()
    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(minutes=timeout_min)
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), launch.local_rank, dev, backend)


# ---------------------------------------------------------------------------- collectives


def is_multi() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def collective_device(backend: str | None = None) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device for NCCL, the CPU otherwise."""
    if backend is None:
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "gloo"
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


def _into_tensor(out: torch.Tensor, inp: torch.Tensor, async_op: bool):
    # torch 2.13 renamed all_gather_into_tensor all_gather_single (the old name warns); 2.6 has only the old
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, async_op=async_op)


def all_reduce_max(x: float, device: torch.device | None = None) -> float:
    """Max of a host scalar over ranks (one host sync: for flags, not for the hot loop's values)."""
    if not is_multi():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_max_flag(flag: torch.Tensor) -> bool:
    """Whether ``flag`` (a bool tensor on the compute device, e.g. ``~torch.isfinite(loss)``) is true on
    any rank: reduced on the device, then one host sync for the answer (not one per rank, nor a host
    scalar sent to the device first)."""
    t = flag.detach().reshape(-1).any().to(torch.float32).reshape(1)
    if is_multi():
        t = _on(t, collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over ranks (``sum`` or ``max``); ``t`` may live anywhere."""
    if not is_multi():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    c = _on(t, collective_device())
    dist.all_reduce(c, op=ops[op])
    if c is not t:
        t.copy_(c)
    return t


def all_gather_stack(t: torch.Tensor) -> torch.Tensor:
    """``[world, *t.shape]``: every rank's ``t`` in rank order, on ``t``'s device. One flat collective."""
    if not is_multi():
        return t.unsqueeze(0)
    dev = collective_device()
    mine = _on(t.contiguous(), dev)
    out = torch.empty(world_size() * t.numel(), dtype=t.dtype, device=dev)
    _into_tensor(out, mine.view(-1), async_op=False)
    return _on(out.view(world_size(), *t.shape), t.device)


def all_gather_flat(out: torch.Tensor, part: torch.Tensor, async_op: bool = False):
    """Every rank's ``part`` (1-D, the same size everywhere) into ``out`` (``world x part`` elements, in
    rank order). ``out`` must be on the collective's device (an EMA gather buffer on the GPU); ``part``
    is moved there and cast to ``out``'s dtype. With ``async_op`` returns the work handle (keep ``part``
    alive until it completes: the returned pair holds it)."""
    if not is_multi():
        out.copy_(part)
        return None
    dev = collective_device()
    if out.device != dev:
        raise ValueError(f"all_gather_flat: the output must be on {dev}, not {out.device}")
    src = part.to(dev, out.dtype, non_blocking=True).contiguous()
    work = _into_tensor(out, src, async_op=async_op)
    return (work, src) if async_op else None


def gather_to_rank0(t: torch.Tensor) -> list[torch.Tensor] | None:
    """Rank 0: every rank's ``t`` (same shape everywhere) in rank order, on the collective's device;
    other ranks: None. The caller moves what it keeps."""
    if not is_multi():
        return [t]
    dev = collective_device()
    mine = _on(t.contiguous(), dev)
    got = [torch.empty_like(mine) for _ in range(world_size())] if rank() == 0 else None
    dist.gather(mine, got, dst=0)
    return got


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: rank ``src``'s ``t`` on every rank."""
    if not is_multi():
        return t
    c = _on(t, collective_device())
    dist.broadcast(c, src=src)
    if c is not t:
        t.copy_(c)
    return t


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (for small metadata only: bench results)."""
    if not is_multi():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_multi():
        if collective_device().type == "cuda":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# ---------------------------------------------------------------------------- checks over ranks


def check_shared_dir(folder: Path) -> None:
    """Collective: refuse, on every rank, unless every rank sees the same ``folder`` (checkpoints are
    written by all ranks and renamed by rank 0: a node-local output.dir loses them). Rank 0 writes a
    random nonce there; every rank must read it back."""
    if not is_multi():
        return
    folder.mkdir(parents=True, exist_ok=True)
    nonce = torch.zeros(1, dtype=torch.int64)
    probe = folder / ".shared_fs_check"
    if rank() == 0:
        nonce[0] = int.from_bytes(os.urandom(7), "little")
        tmp = probe.with_suffix(".tmp")
        tmp.write_text(str(int(nonce[0])))
        os.replace(tmp, probe)
    broadcast_(nonce)
    try:
        seen = int(probe.read_text()) == int(nonce[0])
    except (OSError, ValueError):
        seen = False
    blind = torch.tensor([0.0 if seen else 1.0])
    all_ranks = all_gather_stack(blind)
    missing = [r for r, b in enumerate(all_ranks.tolist()) if b[0] > 0]
    if missing:
        raise UserError(
            f"output.dir {folder} is not the same folder on every rank: ranks {missing} do not see the file "
            f"rank 0 wrote there ({probe.name}); put it on a file system every node mounts"
        )
