"""Report: mean and standard error per metric per model, as JSON, a markdown table in the layout of
the Adaptive-DPO paper's Table 3 (models as rows, metrics as columns), and a PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def describe(values) -> dict:
    """The finite values' count ``n``, ``mean`` (None without one) and standard error of the mean
    ``sem`` (None with fewer than two), and the finite ``values`` themselves, in order."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = int(v.size)
    sem = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"mean": float(v.mean()) if n else None, "sem": sem, "n": n, "values": v.tolist()}


def mean_sem(values) -> dict:
    """``describe``'s mean, sem and n, NaN where it has None (the report's tables and plots)."""
    d = describe(values)
    nan = float("nan")
    return {
        "mean": nan if d["mean"] is None else d["mean"],
        "sem": nan if d["sem"] is None else d["sem"],
        "n": d["n"],
    }


def markdown_table(rows: dict[str, dict[str, dict]], metrics: list[str]) -> str:
    head = "| model | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    lines = []
    for model, vals in rows.items():
        cells = []
        for m in metrics:
            x = vals.get(m)
            if x is None or not math.isfinite(x["mean"]):
                cells.append("-")
            elif math.isfinite(x["sem"]):
                cells.append(f"{x['mean']:.4f} ± {x['sem']:.4f}")
            else:
                cells.append(f"{x['mean']:.4f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def bar_plot(rows: dict[str, dict[str, dict]], metrics: list[str], path: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(m in v and math.isfinite(v[m]["mean"]) for v in rows.values())]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    names = list(rows)
    for ax, m in zip(axes[0], metrics):
        means = [rows[n].get(m, {"mean": np.nan})["mean"] for n in names]
        sems = [rows[n].get(m, {"sem": np.nan})["sem"] for n in names]
        ax.bar(
            range(len(names)),
            means,
            yerr=[0 if not math.isfinite(s) else s for s in sems],
            capsize=3,
            color="tab:blue",
        )
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_title(m, fontsize=9)
        lo = np.nanmin(means) - 2 * np.nanmax([s if math.isfinite(s) else 0 for s in sems] + [0])
        if m.startswith("accuracy"):
            ax.axhline(0.5, color="gray", lw=0.8, ls="--")
            ax.set_ylim(min(0.4, lo), 1.0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
