"""Per-pair statistics: every rank's values on every rank (one all-gather), and their summary for the log.

After each micro-step the trainer gathers the per-pair statistics the step returned (objective stats
such as ``h``, ``u``, ``W``; the per-pair loss) and the workload's per-pair batch fields (``user_id``,
``flipped``, ...) from all ranks, in rank order. Every rank then holds the same arrays: rank 0 logs
them, and a stateful objective updates its state from them on every rank alike, with no collective
of its own. Integer fields travel as int64 (exact: a ``user_id`` of 2**40 arrives unchanged); float
values as their float32 bit patterns inside the same int64 tensor, so one all-gather carries both.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.engine.dist import all_gather_stack


def _rows(
    stats: dict[str, torch.Tensor], fields: dict[str, torch.Tensor], device
) -> tuple[torch.Tensor, dict]:
    rows, kinds = [], {}
    for name, t in sorted(stats.items()):
        rows.append(t.detach().float().to(device).view(torch.int32).to(torch.int64))
        kinds[name] = "float"
    for name, t in sorted(fields.items()):
        t = t.detach().to(device)
        if t.is_floating_point():
            rows.append(t.float().view(torch.int32).to(torch.int64))
            kinds[name] = "float"
        else:
            rows.append(t.to(torch.int64))
            kinds[name] = "bool" if t.dtype == torch.bool else "int"
    return torch.stack(rows), kinds  # [rows, B] int64


def _decode(arr: np.ndarray, kinds: dict) -> dict[str, np.ndarray]:
    out = {}
    for i, (name, kind) in enumerate(kinds.items()):
        if kind == "float":
            out[name] = arr[i].astype(np.int32).view(np.float32)
        elif kind == "bool":
            out[name] = arr[i] != 0
        else:
            out[name] = arr[i]
    return out


def gather_pair_stats_many(
    steps: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]], device: torch.device, world: int
) -> list[dict[str, np.ndarray]]:
    """``gather_pair_stats`` of several micro-steps at once: one all-gather and one device -> host copy
    for all of them (the trainer calls it once per optimizer step, not per micro-step). Every micro-step
    must have the same names and B. Returns one dict per micro-step, each as ``gather_pair_stats``'s."""
    if not steps:
        return []
    mats = [_rows(stats, fields, device) for stats, fields in steps]
    kinds = mats[0][1]
    mat = torch.stack([m for m, _ in mats])  # [n, rows, B]
    n, r, b = mat.shape
    if world > 1:  # [world, n, rows, B] -> per micro-step [rows, world * B], rank order
        mat = all_gather_stack(mat).permute(1, 2, 0, 3).reshape(n, r, world * b)
    arr = mat.cpu().numpy()
    return [_decode(arr[i], kinds) for i in range(n)]


def gather_pair_stats(
    stats: dict[str, torch.Tensor], fields: dict[str, torch.Tensor], device: torch.device, world: int
) -> dict[str, np.ndarray]:
    """All ranks' per-pair values of this micro-step, concatenated in rank order, on every rank.

    ``stats``: name -> [B] float tensors (sent as float32); ``fields``: name -> [B] tensors sent by
    dtype: floating -> float32, bool -> bool, integer -> int64 (exact). Every rank must pass the same
    names with the same B. Returns name -> [world * B] numpy arrays.
    """
    return gather_pair_stats_many([(stats, fields)], device, world)[0]


class StatsAccumulator:
    """Gathered per-pair arrays since the last log line (rank 0)."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, stats: dict[str, np.ndarray]) -> None:
        for k, v in stats.items():
            self.parts.setdefault(k, []).append(v)

    def pop(self) -> dict[str, np.ndarray]:
        cat = {k: np.concatenate(v) for k, v in self.parts.items()}
        self.parts = {}
        return cat


def summarize(
    cat: dict[str, np.ndarray], stat_names: list[str], distributions: tuple[str, ...]
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Scalars and histograms of the per-pair ``stat_names`` in ``cat``: the mean of each (NaN
    entries, e.g. Adaptive-DPO's ``u`` during its warm-up, ignored; a stat that is all NaN is left
    out), and for those named in ``distributions`` also ``<name>_std`` and a histogram."""
    scalars: dict[str, float] = {}
    hists: dict[str, np.ndarray] = {}
    for k in stat_names:
        v = cat[k].astype(np.float64)
        if not np.isfinite(v).any():
            continue
        scalars[k] = float(np.nanmean(v))
        if k in distributions:
            scalars[f"{k}_std"] = float(np.nanstd(v))
            hists[k] = cat[k]
    return scalars, hists


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA), else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def engine_scalars(engine, precision: str, device: torch.device) -> dict[str, float]:
    """The optimizer's side of a log line: learning rate, fp16 loss scale, steps DeepSpeed skipped
    on gradient overflow, peak memory."""
    scale = getattr(engine.optimizer, "loss_scale", 1.0) if precision == "fp16" else 1.0
    return {
        "lr": float(engine.get_lr()[0]),
        "loss_scale": float(scale),
        "skipped_steps": int(engine.skipped_steps),
        "peak_mem_gb": peak_memory_gb(device),
    }
