"""Per-step metrics (JSONL + TensorBoard, rank 0) and per-pair records (parquet, every rank).

Both are rewound on resume: lines and record files past the checkpoint's step are dropped, so a
killed-and-resumed run's logs equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

# metrics of the process, not of the training: a resumed run may log other values for these (timing,
# memory, and the EMA transfers a fresh process makes to fill its buffers); every other metric of a
# resumed run equals the uninterrupted run's
PROCESS_METRICS = ("step_time_s", "pairs_per_s", "peak_mem_gb", "ema_gathers_per_step")


class MetricsLogger:
    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if rec.get("step", 0) <= resume_step:
                    keep.append(line)
            self.path.write_text("".join(x + "\n" for x in keep))
        self.f = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, scalars: dict[str, float], hists: dict[str, np.ndarray] | None = None) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in scalars.items()
        }
        self.f.write(json.dumps({"step": step, **clean}) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            for k, v in (hists or {}).items():
                v = v[np.isfinite(v)]
                if v.size:
                    self.tb.add_histogram(k, v, step)

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class PairRecorder:
    """Buffers per-pair rows and writes them as ``pairs/rank_RRRRR/upto_SSSSSSSS.parquet`` at each checkpoint."""

    def __init__(self, out_dir: Path, rank: int, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.dir = out_dir / "pairs" / f"rank_{rank:05d}"
        self.rows: dict[str, list] = {}
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            for f in self.dir.glob("upto_*.parquet"):
                if int(f.stem.split("_")[1]) > resume_step:
                    f.unlink()
            for f in self.dir.glob(".*tmp*"):
                f.unlink()

    def add(self, step: int, columns: dict[str, list], stats: dict) -> None:
        """``columns``: per-pair values of the batch (``key`` first); ``stats``: name -> [B] values
        (numpy arrays or host tensors: the trainer passes its slice of the gathered arrays)."""
        if not self.enabled:
            return
        b = len(columns["key"])
        cols = {"step": [step] * b, **columns}
        for k, v in stats.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().cpu().numpy()
            cols[k] = np.asarray(v, dtype=np.float32).tolist()
        for k, v in cols.items():
            self.rows.setdefault(k, []).extend(v)

    def flush(self, step: int) -> None:
        if not self.enabled or not self.rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = max(len(v) for v in self.rows.values())
        table = pa.table({k: v if len(v) == n else [None] * (n - len(v)) + v for k, v in self.rows.items()})
        final = self.dir / f"upto_{step:08d}.parquet"
        tmp = self.dir / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        tmp.replace(final)
        self.rows = {}


def read_pair_records(run_dir: Path):
    """All ranks' per-pair records of a run as one pyarrow table (columns may differ by objective)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(run_dir) / "pairs").glob("rank_*/upto_*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
