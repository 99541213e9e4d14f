"""Stage feedback: D3PO trajectories -> per-pair preferences, from scripted rewards or people's labels.

    python -m stages.feedback --config configs/feedback/tiny.yaml trajectories=/runs/d3po/traj \
        out=/runs/d3po/prefs rewards=[jpeg_compressibility]
    python -m stages.feedback --config configs/feedback/tiny.yaml trajectories=/runs/d3po/traj \
        out=/runs/d3po/prefs source=human human=/labels/export/image_preferences.jsonl

Reads every prompt group of the trajectory folder in manifest order and writes, for every pair of
its K images, which one is preferred (``pipeline.d3po.preferences`` describes the file). Rewards
only compare (several by Pareto dominance); a group with an image that does not decode is skipped
and counted, never a traceback. People's labels (the labelling export's ``image_preferences.jsonl``)
need no image decoding: they are matched to the folder's images by image key. One process, no GPU
unless a scorer reward asks for one; rerunning with the same inputs writes the same bytes, and a
killed run leaves the previous files (each is replaced by an atomic rename).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline import cli
from pipeline.config import to_dict
from pipeline.d3po import preferences as prefs
from pipeline.d3po.rewards import Reward, make_reward
from pipeline.errors import UserError
from pipeline.schema.feedback import FeedbackConfig

log = logging.getLogger("stages.feedback")


def _score(rewards: list[Reward], batch: list[tuple[prefs.Group, list]]) -> list[np.ndarray]:
    """[K, R] values of each group in ``batch``: every reward called once on all the batch's images."""
    images = [im for _, ims in batch for im in ims]
    prompts = [g.prompt for g, ims in batch for _ in ims]
    cols = np.stack([r(images, prompts) for r in rewards], axis=1)
    out, start = [], 0
    for _, ims in batch:
        out.append(cols[start : start + len(ims)])
        start += len(ims)
    return out


def run_rewards(cfg: FeedbackConfig, groups, flip) -> tuple[list[dict], Counter, list[np.ndarray], int]:
    paths = {n: getattr(cfg.scorers, n) for n in ("aesthetic", "pickscore", "hpsv2", "imagereward")}
    rewards = [make_reward(n, paths, cfg.scorers.device, cfg.scorers.dtype) for n in cfg.rewards]
    source = "reward:" + ",".join(r.name for r in rewards)
    rows, skipped, values, n_groups = [], Counter(), [], 0
    batch: list[tuple[prefs.Group, list]] = []

    def flush() -> None:
        nonlocal n_groups
        for (g, _), v in zip(batch, _score(rewards, batch)):
            rows.extend(prefs.group_rows(g, v, source, flip))
            values.append(v)
            n_groups += 1
        batch.clear()

    for g in groups:
        if isinstance(g, prefs.BadGroup):
            skipped[g.reason] += 1
            log.warning("%s: sample %s skipped (%s)", g.shard, g.key, g.reason)
            continue
        images = prefs.decode_images(g)
        if images is None:
            skipped["corrupt_image"] += 1
            log.warning("%s: group %s skipped (an image does not decode)", g.shard, g.key)
            continue
        batch.append((g, images))
        if sum(len(ims) for _, ims in batch) >= cfg.scorers.batch_size:
            flush()
    if batch:
        flush()
    return rows, skipped, values, n_groups


def run_human(cfg: FeedbackConfig, groups, flip) -> tuple[list[dict], Counter, list[np.ndarray], int, dict]:
    scores = prefs.read_human(cfg.human)  # type: ignore[arg-type]  # check(): set with source=human
    good, skipped, bad_keys = [], Counter(), set()
    for g in groups:
        if isinstance(g, prefs.BadGroup):
            skipped[g.reason] += 1
            bad_keys.add(g.key)
            log.warning("%s: sample %s skipped (%s)", g.shard, g.key, g.reason)
        else:
            g.jpegs = []  # people's labels need no pixels; a long folder's JPEGs would pile up here
            good.append(g)
    known = {k for g in good for k in g.image_keys}
    unknown = prefs.check_unknown(scores, known, cfg.unknown_images, cfg.trajectories, bad_keys)
    rows, values, n_groups, unlabelled_pairs = [], [], 0, 0
    for g in good:
        means, votes, exact = prefs.human_group(g, scores)
        group_rows = prefs.group_rows(g, means, "human", flip, votes=votes, order=exact)
        k = len(g.image_keys)
        unlabelled_pairs += k * (k - 1) // 2 - len(group_rows)
        if not group_rows:
            skipped["unlabelled"] += 1
            continue
        rows.extend(group_rows)
        values.append(means[np.array(votes) > 0])
        n_groups += 1
    info = {
        "file_sha256": hashlib.sha256(scores.path.read_bytes()).hexdigest(),
        "lines": scores.lines,
        "images": len(scores.counts),
        "unknown_images": unknown,
        "unlabelled_pairs": unlabelled_pairs,
    }
    return rows, skipped, values, n_groups, info


def _mean(v: np.ndarray) -> float | None:
    """Mean over the scored images (None when there are none, or a reward gave only NaN)."""
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def main(cfg: FeedbackConfig) -> int:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out}: exists and is not a folder")
    manifest = prefs.read_manifest(cfg.trajectories)
    groups = prefs.iter_groups(cfg.trajectories, manifest, verify=cfg.verify)
    flip = (cfg.flip_rate, cfg.flip_seed, cfg.flip_by)
    human = None
    if cfg.source == "human":
        rows, skipped, values, n_groups, human = run_human(cfg, groups, flip)
        names, source = ["human"], "human"
    else:
        rows, skipped, values, n_groups = run_rewards(cfg, groups, flip)
        names, source = list(cfg.rewards), "reward:" + ",".join(cfg.rewards)
    allv = np.concatenate(values) if values else np.zeros((0, len(names)))
    summary = {
        "source": source,
        "trajectories": {
            "manifest_sha256": hashlib.sha256(
                (Path(cfg.trajectories) / "manifest.json").read_bytes()
            ).hexdigest(),
            "shards": len(manifest.get("shards", [])),
        },
        "human": human,
        "flip": {"rate": cfg.flip_rate, "seed": cfg.flip_seed, "by": cfg.flip_by},
        "groups": n_groups,
        "skipped": dict(sorted(skipped.items())),
        "mean_value": {n: _mean(allv[:, c]) for c, n in enumerate(names)},
        "config": to_dict(cfg),
    }
    written = prefs.write_preferences(out, rows, names, summary)
    log.info(
        "%s: %d groups (%s skipped), %d pairs: %d decided, %d ties, %d flipped",
        out,
        n_groups,
        sum(skipped.values()),
        written["pairs"],
        written["decided"],
        written["ties"],
        written["flipped"],
    )
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run("python -m stages.feedback", FeedbackConfig, main, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli_main())
