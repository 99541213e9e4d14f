"""Library helpers of D3PO's online loop (``stages.online``): phase markers, scoring a sample folder
with the feedback's rewards, the grid of evaluation images, the per-round metrics and the plot.

A phase is finished when its marker ``<name>.done`` exists; the marker is written last and by atomic
rename, so a killed loop leaves either a finished phase or an unfinished one (redone on the next run,
where each stage is restart-safe by itself), never a half-written marker.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from pipeline.d3po import preferences as prefs
from pipeline.d3po.rewards import Reward
from pipeline.errors import UserError


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a rerun) sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def marker(folder: Path, phase: str) -> Path:
    return folder / f"{phase}.done"


def read_done(folder: Path, phase: str) -> dict | None:
    """The phase's marker (what it recorded), or None when the phase has not finished."""
    p = marker(folder, phase)
    return json.loads(p.read_text()) if p.is_file() else None


def load_images(folder: Path) -> tuple[list, list[str]]:
    """Every image of a complete trajectory folder (manifest order, group by group) and its prompt."""
    images, prompts = [], []
    for g in prefs.iter_groups(folder, prefs.read_manifest(folder)):
        if isinstance(g, prefs.BadGroup):
            raise UserError(f"{folder}: group {g.key} is malformed ({g.reason}); sample it again")
        ims = prefs.decode_images(g)
        if ims is None:
            raise UserError(f"{folder}: an image of group {g.key} does not decode; sample it again")
        images += ims
        prompts += [g.prompt] * len(ims)
    return images, prompts


def score(rewards: list[Reward], images: list, prompts: list[str]) -> dict[str, dict]:
    """Per reward: mean, standard error of the mean, n and every value (manifest order). The same
    rewards the feedback compares with, here as absolute values of fresh samples."""
    out = {}
    for r in rewards:
        v = r(images, prompts)
        v = v[np.isfinite(v)]
        n = len(v)
        se = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else None
        out[r.name] = {"mean": float(v.mean()) if n else None, "se": se, "n": n, "values": v.tolist()}
    return out


def grid(images: list, columns: int, path: Path, cell: int = 128) -> None:
    """The images as one PNG, a prompt group per row (``columns`` = K images), each cell ``cell`` px."""
    from PIL import Image

    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, im in enumerate(images):
        sheet.paste(im.resize((cell, cell), Image.NEAREST), ((i % columns) * cell, (i // columns) * cell))
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    os.replace(tmp, path)


def round_metrics(metrics_file: Path, first: int, last: int) -> dict:
    """The training metrics of optimizer steps ``first..last`` (one round) from the run's metrics.jsonl:
    the last step's loss and accuracy and the round's means."""
    from pipeline.metrics_log import read_metrics

    rows = [r for r in read_metrics(metrics_file) if first <= r.get("step", 0) <= last]
    if not rows:
        return {"steps": [first, last], "logged": 0}

    def mean(k: str) -> float | None:
        v = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        return float(np.mean(v)) if v else None

    last_row = rows[-1]
    return {
        "steps": [first, last],
        "logged": len(rows),
        "last_step": last_row["step"],
        "loss": last_row.get("loss"),
        "accuracy": last_row.get("accuracy"),
        "mean_loss": mean("loss"),
        "mean_accuracy": mean("accuracy"),
        "sampled_gap": mean("sampled_gap"),
    }


def plot_rewards(rows: list[dict], reward_names: list[str], path: Path) -> None:
    """Mean eval reward per round (round -1 = the base before training), +- one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reward_names), figsize=(4.5 * len(reward_names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], reward_names):
        xs = [r["round"] for r in rows]
        ys = [r["eval"][name]["mean"] for r in rows]
        es = [r["eval"][name]["se"] or 0.0 for r in rows]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3)
        ax.set_xticks(xs, ["base" if x < 0 else str(x) for x in xs])
        ax.set_xlabel("after round")
        ax.set_ylabel(f"eval {name} (mean +- s.e.)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
