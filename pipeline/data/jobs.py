"""One job of a shard-writing job array: the skeleton the encode and the sample stages share.

Run a stage as many independent jobs as you like (torchrun / deepspeed / SLURM set RANK and
WORLD_SIZE, or give dist.rank=R dist.world_size=W): shard i belongs to job i % W, and which items
(pairs, prompt groups) go to shard i depends only on the plan and ``output.shard_size``, never on W.
Every job writes (or checks) the same ``plan.json``, its resolved config under ``jobs/``, removes the
temporaries a killed writer of its shards left, and skips the shards already finished (their sidecar
record and hashes match, ``pipeline.data.shards.finished_record``), so a restarted job redoes only the
others. Each shard is written by ``pipeline.data.shards.write_shard`` (tar, then its record); the
last job to finish merges the manifest (``pipeline.data.manifest.merge_manifest``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.config import write_resolved
from pipeline.data.manifest import check_or_write_plan, shard_ranges
from pipeline.data.shards import finished_record, remove_stale_tmp, shard_name, write_shard
from pipeline.dist_env import JobInfo, job_info
from pipeline.errors import UserError

log = logging.getLogger(__name__)
NOT_MERGED = "  manifest   not yet: other jobs' shards are missing (the last job to finish writes it)"


def job_of(dist) -> JobInfo:
    """This job's place in the array: ``dist.rank`` / ``dist.world_size``, else the launcher's."""
    try:
        return job_info(dist.rank, dist.world_size)
    except ValueError as e:
        raise UserError(str(e)) from e


@dataclass
class ShardJob:
    """This job's shards (``todo``: not finished yet) and what it wrote, for its summary."""

    stage: str  # "encode", "sample": names the job in its log, progress bar and summary
    out: Path
    job: JobInfo
    ranges: list[tuple[int, int]]  # [start, end) of every shard's items
    mine: list[int]  # this job's shards
    todo: list[int]  # this job's shards that are not finished
    started: float  # for "done in": the stage's start
    work_started: float = field(default_factory=time.time)
    work_seconds: float = 0.0  # from the end of the planning to the last shard written
    written: int = 0
    items: int = 0  # pairs or prompt groups written
    bytes: int = 0  # of the shards and their text files

    def pending(self) -> Iterator[tuple[int, int, int]]:
        """(shard, start, end) of every shard to write, in order."""
        for i in self.todo:
            yield (i, *self.ranges[i])

    def progress(self, unit: str) -> tqdm:
        total = sum(self.ranges[i][1] - self.ranges[i][0] for i in self.todo)
        return tqdm(total=total, unit=unit, desc=f"{self.stage} job {self.job.rank}")

    def write(self, index: int, samples: list[dict[str, bytes]], record: dict) -> dict:
        """Write shard ``index`` (tar, then its sidecar ``record`` with the index) and count it."""
        rec = write_shard(self.out / shard_name(index), samples, {"index": index, **record})
        self.written += 1
        self.items += rec["count"]
        self.bytes += rec["bytes"] + sum(t["bytes"] for t in rec.get("text_files", []))
        return rec

    def stop_clock(self) -> None:
        self.work_seconds = time.time() - self.work_started

    def summary(self, before: list[str], after: list[str], manifest_lines: list[str] | None) -> str:
        """The job's report: a headline, ``before`` (model, settings), the shards written and finished
        before, ``after`` (this job's rates, skipped input), then the manifest's lines (None: not merged)."""
        lines = [
            f"{self.stage} job {self.job.rank} of {self.job.world_size} done in {time.time() - self.started:.1f} s -> {self.out}",
            *before,
            f"  shards     {self.written} written, {len(self.mine) - len(self.todo)} already finished "
            f"(of {len(self.mine)} for this job, {len(self.ranges)} in all)",
            *after,
            *(manifest_lines if manifest_lines is not None else [NOT_MERGED]),
        ]
        return "\n".join(lines)


def open_job(
    stage: str,
    cfg,
    job: JobInfo,
    plan: dict,
    n_items: int,
    *,
    what: str,
    files: Callable[[int], list[str]] = lambda i: [shard_name(i)],
    started: float | None = None,
) -> ShardJob:
    """Check or write ``plan.json`` (``what``: how to name another run's folder), write this job's
    resolved config, cut ``n_items`` into shards of ``cfg.output.shard_size``, remove the stale
    temporaries of this job's shards (``files``: the file names of shard i) and find the unfinished
    ones (re-hashing the finished ones with ``cfg.run.verify_existing``)."""
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time() if started is None else started
    check_or_write_plan(out, plan, what)
    write_resolved(cfg, out / "jobs" / f"job-{job.rank:05d}-of-{job.world_size:05d}.yaml")
    ranges = shard_ranges(n_items, cfg.output.shard_size)
    mine = [i for i in range(len(ranges)) if i % job.world_size == job.rank]
    stale = remove_stale_tmp(out, [name for i in mine for name in files(i)])
    todo = [i for i in mine if finished_record(out / shard_name(i), verify=cfg.run.verify_existing) is None]
    log.info(
        "job %d/%d (%s): %d of %d shards are this job's; %d already finished, %d to %s%s",
        job.rank,
        job.world_size,
        job.source,
        len(mine),
        len(ranges),
        len(mine) - len(todo),
        len(todo),
        stage,
        f"; removed {stale} stale temporaries" if stale else "",
    )
    return ShardJob(stage, out, job, ranges, mine, todo, started)
