"""What a round of D3PO's online loop (``pipeline.d3po.loop``) reports: the evaluation of a policy (fresh
samples of the fixed eval prompts, scored with the feedback's rewards), the training metrics of the
round's optimizer steps, the round's report row, and the loop's table and plot of them.

An evaluation folder holds ``samples/`` (a trajectory folder: the sample stage's job with the eval
seed), ``grid.png`` (a prompt group per row) and ``scores.json`` (written last): per reward the
``mean``, its standard error ``se`` (``pipeline.evaluate.report.describe``: None with fewer than two
values), ``n`` and every finite value in manifest order.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.d3po import feedback, sampling
from pipeline.d3po.rewards import Reward
from pipeline.d3po.trajectories import read_images
from pipeline.evaluate.generate import grid
from pipeline.evaluate.report import describe
from pipeline.io import atomic_write_bytes, write_json_atomic
from pipeline.metrics_log import read_metrics
from pipeline.schema.feedback import FeedbackConfig
from pipeline.schema.sample import SampleConfig

GRID_CELL = 128  # px of an image in the eval grid


def reward_scores(rewards: list[Reward], images: list, prompts: list[str]) -> dict[str, dict]:
    """Per reward: mean, standard error of the mean (``se``), n and every finite value (in order). The
    rewards the feedback compares with, here as absolute values of fresh samples."""
    out = {}
    for r in rewards:
        d = describe(r(images, prompts))
        out[r.name] = {"mean": d["mean"], "se": d["sem"], "n": d["n"], "values": d["values"]}
    return out


def save_grid(images: list, columns: int, path: Path) -> None:
    """The images as one PNG (``pipeline.evaluate.generate.grid``), a prompt group of ``columns``
    images per row, each image ``GRID_CELL`` px; written atomically."""
    cells = [im.resize((GRID_CELL, GRID_CELL), Image.NEAREST) for im in images]
    sheet = grid([cells[i : i + columns] for i in range(0, len(cells), columns)], pad=0)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def evaluate_policy(
    samples: SampleConfig, fb: FeedbackConfig, reward_names: list[str], folder: Path, policy: str | None
) -> None:
    """Sample the eval prompts as ``samples`` says (with the ``policy``, None: the base; into
    ``folder/samples``), score every image with ``reward_names`` (scorers as ``fb`` configures them)
    and write ``grid.png``, then ``scores.json``."""
    print(sampling.sample_trajectories(samples), flush=True)
    rewards = feedback.make_rewards(reward_names, fb.scorers)
    images, prompts = read_images(folder / "samples")
    scores = reward_scores(rewards, images, prompts)
    save_grid(images, samples.sampler.images_per_prompt, folder / "grid.png")
    summary = {"unet": policy or "base", "seed": samples.sampler.seed, "rewards": scores}
    write_json_atomic(folder / "scores.json", summary, indent=2)


def eval_summary(folder: Path) -> dict:
    """An evaluation's rewards without their values: ``{"rewards": {name: {mean, se, n}}}``."""
    scores = json.loads((folder / "scores.json").read_text())["rewards"]
    return {"rewards": {k: {"mean": v["mean"], "se": v["se"], "n": v["n"]} for k, v in scores.items()}}


def round_metrics(metrics_file: Path, first: int, last: int) -> dict:
    """The training metrics of optimizer steps ``first..last`` (one round) from the run's metrics.jsonl:
    the last step's loss and accuracy and the round's means."""
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
        # what moves when the policy learns, while the loss stays near log 2 (beta 0.1, a clamp of
        # +-log 1.1): the policy's log-ratio to the reference on winners minus losers (its implied
        # reward margin / beta), and the share of ratios held by the clamp
        "log_ratio_gap": _gap(rows),
        "clip_frac": mean("clip_frac"),
    }


def _gap(rows: list[dict]) -> float | None:
    v = [
        r["log_ratio_w"] - r["log_ratio_l"]
        for r in rows
        if isinstance(r.get("log_ratio_w"), (int, float)) and isinstance(r.get("log_ratio_l"), (int, float))
    ]
    return float(np.mean(v)) if v else None


def win_rate(folder: Path, base: Path) -> dict[str, dict]:
    """Per reward: the share of eval images that score higher after this round than the base's image of
    the same prompt and seed (ties count one half), with its binomial standard error. The eval samples
    share their noise across rounds, so the comparison is paired."""
    now = json.loads((folder / "scores.json").read_text())["rewards"]
    then = json.loads((base / "scores.json").read_text())["rewards"]
    out = {}
    for name, d in now.items():
        a, b = np.asarray(d["values"], float), np.asarray(then.get(name, {}).get("values", []), float)
        if len(a) == 0 or len(a) != len(b):
            continue
        w = float(np.mean((a > b) + 0.5 * (a == b)))
        out[name] = {"rate": w, "se": float(np.sqrt(w * (1 - w) / len(a))), "n": len(a)}
    return out


def round_row(r: int, done: dict, feedback_summary: dict, phases: tuple[str, ...]) -> dict:
    """Round r's report (``round_NNN/report.json``, a row of the loop's): from its phases' markers
    ``done`` and its feedback's ``summary.json``."""
    return {
        "round": r,
        "sampled_with": done["sample"].get("unet"),
        "eval": done["eval"]["rewards"],
        "train": done["train"]["metrics"],
        "feedback": {
            k: feedback_summary.get(k) for k in ("groups", "pairs", "decided", "ties", "mean_value")
        },
        "seconds": {p: done[p]["seconds"] for p in phases},
    }


def round_table(rows: list[dict], names: list[str]) -> str:
    """The rounds as a text table: the eval rewards (mean +- s.e.), the last loss and accuracy, seconds."""
    head = [
        "round",
        *(f"{n} (mean +- s.e.)" for n in names),
        "win rate",
        "gap",
        "loss",
        "accuracy",
        "seconds",
    ]
    lines = [" | ".join(head)]
    for row in rows:
        ev = [f"{row['eval'][n]['mean']:.4f} +- {(row['eval'][n]['se'] or 0):.4f}" for n in names]
        tr = row.get("train") or {}
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        secs = sum(row["seconds"].values())
        rnd = "base" if row["round"] < 0 else str(row["round"])
        wins = row.get("win_rate") or {}
        win = fmt(wins[names[0]]["rate"]) if names and names[0] in wins else "-"
        cells = [win, fmt(tr.get("log_ratio_gap")), fmt(tr.get("loss")), fmt(tr.get("accuracy"))]
        lines.append(" | ".join([rnd, *ev, *cells, f"{secs:.1f}"]))
    return "\n".join(lines)


def plot_learning(rows: list[dict], reward_names: list[str], path: Path) -> None:
    """Per round: the log-ratio gap (winner - loser), the clamp's share, and each reward's win rate of
    the round's eval images against the base's (0.5: no change)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["round"] >= 0]
    xs = [r["round"] for r in trained]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.5))
    gap = [(r.get("train") or {}).get("log_ratio_gap") for r in trained]
    clip = [(r.get("train") or {}).get("clip_frac") for r in trained]
    axes[0].plot(xs, [np.nan if g is None else g for g in gap], marker="o")
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set_ylabel("log-ratio gap, winner - loser")
    axes[1].plot(xs, [np.nan if c is None else c for c in clip], marker="o")
    axes[1].set_ylabel("share of ratios clamped")
    for name in reward_names:
        wr = [(r.get("win_rate") or {}).get(name) for r in trained]
        axes[2].errorbar(
            xs,
            [np.nan if w is None else w["rate"] for w in wr],
            yerr=[0 if w is None else w["se"] for w in wr],
            marker="o",
            capsize=3,
            label=name,
        )
    axes[2].axhline(0.5, color="grey", lw=0.8)
    axes[2].set_ylabel("eval win rate vs the base (+- s.e.)")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_rewards(rows: list[dict], reward_names: list[str], path: Path) -> None:
    """Mean eval reward per round (round -1 = the base before training), +- one standard error."""
    import matplotlib  # only here: the backend is chosen before pyplot's first import

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
