"""Deciding D3PO's preferences: for every pair of the K images of every prompt group of a trajectory
folder, which one is preferred, by scripted rewards or by people's labels; the feedback stage's job
(``decide_preferences``), written as a preference file (``pipeline.d3po.feedback_files``).

Rewards only compare (several by Pareto dominance, ``pipeline.d3po.rewards``); a group with an image
that does not decode is skipped and counted, never a traceback. Decided pairs can be flipped on
purpose (``flip_rate``, by pair or by prompt: ``pipeline.d3po.rewards.maybe_flip``); the flips are
recorded.

**People's labels** come from the labelling service's export, ``image_preferences.jsonl``
(``pipeline.label.export``: one line per judged image, ``{"prompt_key", "image_key", "user_id",
"annotator", "score", "created_at"}``, score in [0, 1]). As its contract says, the scores of an image
are averaged (over annotators and items) and every pair of a group whose means differ trains; equal
means are ties; a pair with an image nobody judged is left out (counted as ``unlabelled_pairs``) and a
group with no judged pair is skipped as ``unlabelled``. Images are matched by ``image_key`` (``KEY/j``,
as the sample stage lists them); ``prompt_key`` is not used. A label of an image that is not in the
trajectory folder is an error naming it (``unknown_images=error``, the default: the labels were likely
made on another sample run), or dropped and counted (``unknown_images=skip``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.config import to_dict
from pipeline.d3po.feedback_files import write_preferences
from pipeline.d3po.rewards import Reward, make_reward, maybe_flip, pareto
from pipeline.d3po.trajectories import BadGroup, Group, decode_images, iter_groups, read_manifest
from pipeline.errors import UserError
from pipeline.evaluate.report import describe
from pipeline.io import read_jsonl
from pipeline.label.export import PREFERENCES
from pipeline.schema.feedback import FeedbackConfig

log = logging.getLogger(__name__)
# the scorer folders of a feedback config's ``scorers``
SCORER_PATHS = ("aesthetic", "pickscore", "hpsv2", "imagereward")


@dataclass
class HumanScores:
    """Per image key: the sum and count of its scores (exact, so equal means compare equal)."""

    path: Path
    sums: dict[str, Fraction] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    first_line: dict[str, int] = field(default_factory=dict)
    lines: int = 0

    def mean(self, image_key: str) -> Fraction | None:
        n = self.counts.get(image_key, 0)
        return self.sums[image_key] / n if n else None


def human_file(path: str | Path) -> Path:
    """``image_preferences.jsonl`` itself, or the export folder holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / PREFERENCES
    if not p.is_file():
        raise UserError(f"human={path}: no such file (give image_preferences.jsonl or the export folder)")
    return p


def read_human(path: str | Path) -> HumanScores:
    """Read the labelling export's per-image preference file; a malformed line is a UserError naming it."""
    p = human_file(path)
    out = HumanScores(p)
    for no, rec in read_jsonl(p):
        key, score = rec.get("image_key"), rec.get("score")
        if not isinstance(key, str) or not key:
            raise UserError(f"{p}:{no}: image_key: expected a non-empty string, got {key!r}")
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
            raise UserError(f"{p}:{no}: score: expected a number in [0, 1], got {score!r}")
        out.sums[key] = out.sums.get(key, Fraction(0)) + Fraction(score)
        out.counts[key] = out.counts.get(key, 0) + 1
        out.first_line.setdefault(key, no)
        out.lines += 1
    return out


def check_unknown(
    scores: HumanScores,
    known: set[str],
    policy: str,
    folder: str | Path,
    skipped_groups: set[str] = frozenset(),
) -> int:
    """Labels of images the trajectory folder does not have: an error naming the first (``error``), or
    their count (``skip``; they are then ignored, since matching is by image key). Labels of a group the
    run skipped (``KEY/j`` of a malformed sample) are not unknown: that group is counted already."""
    unknown = sorted(
        (k for k in scores.counts if k not in known and k.split("/")[0] not in skipped_groups),
        key=lambda k: scores.first_line[k],
    )
    if unknown and policy == "error":
        k = unknown[0]
        raise UserError(
            f"{scores.path}:{scores.first_line[k]}: image_key {k!r} is not an image of the trajectory folder "
            f"{folder} ({len(unknown)} unknown image key(s)); were these labels made on another sample run? "
            "(unknown_images=skip drops and counts them)"
        )
    return len(unknown)


def _cmp_fraction(a: Fraction, b: Fraction) -> int:
    return (a > b) - (a < b)


def group_rows(
    group: Group,
    values: np.ndarray,
    source: str,
    flip: tuple[float, int, str] = (0.0, 0, "pair"),
    votes: Sequence[int] | None = None,
    order: Sequence[Fraction] | None = None,
) -> list[dict]:
    """One row per pair ``i < j`` of a group. ``values`` [K, R] are compared by Pareto dominance, or
    ``order`` (exact human means) when given; pairs with an image of 0 ``votes`` are left out (human
    mode). ``flip`` = (rate, seed, by): decided pairs whose hash falls under the rate are reversed."""
    k = len(group.image_keys)
    values = np.asarray(values, dtype=np.float64).reshape(k, -1)
    rate, seed, by = flip
    rows = []
    for i in range(k):
        for j in range(i + 1, k):
            if votes is not None and (votes[i] == 0 or votes[j] == 0):
                continue
            c = _cmp_fraction(order[i], order[j]) if order is not None else pareto(values[i], values[j])
            winner = i if c > 0 else (j if c < 0 else -1)
            winner, flipped = maybe_flip(winner, i, j, group.key, rate, seed, by)
            rows.append(
                {
                    "key": group.key,
                    "prompt": group.prompt,
                    "prompt_index": group.prompt_index,
                    "i": i,
                    "j": j,
                    "image_i": group.image_keys[i],
                    "image_j": group.image_keys[j],
                    "winner": winner,
                    "flipped": flipped,
                    "values_i": values[i].tolist(),
                    "values_j": values[j].tolist(),
                    "votes_i": int(votes[i]) if votes is not None else 0,
                    "votes_j": int(votes[j]) if votes is not None else 0,
                    "source": source,
                }
            )
    return rows


def human_group(group: Group, scores: HumanScores) -> tuple[np.ndarray, list[int], list[Fraction]]:
    """(mean score [K, 1] as float, votes per image, exact means) of one group's images."""
    votes = [scores.counts.get(k, 0) for k in group.image_keys]
    exact = [scores.mean(k) if n else Fraction(0) for k, n in zip(group.image_keys, votes)]
    means = np.array([[float(m) if n else math.nan] for m, n in zip(exact, votes)], dtype=np.float64)
    return means, votes, exact


def make_rewards(names: list[str], scorers) -> list[Reward]:
    """The rewards ``names``, scorer rewards with their folders, device and dtype from ``scorers`` (a
    feedback config's ``scorers``)."""
    paths = {n: getattr(scorers, n) for n in SCORER_PATHS}
    return [make_reward(n, paths, scorers.device, scorers.dtype) for n in names]


def _score(rewards: list[Reward], batch: list[tuple[Group, list]]) -> list[np.ndarray]:
    """[K, R] values of each group in ``batch``: every reward called once on all the batch's images."""
    images = [im for _, ims in batch for im in ims]
    prompts = [g.prompt for g, ims in batch for _ in ims]
    cols = np.stack([r(images, prompts) for r in rewards], axis=1)
    out, start = [], 0
    for _, ims in batch:
        out.append(cols[start : start + len(ims)])
        start += len(ims)
    return out


def reward_preferences(
    cfg: FeedbackConfig, groups, flip
) -> tuple[list[dict], Counter, list[np.ndarray], int]:
    """(rows, skipped groups by reason, [K, R] values of each scored group, groups) by ``cfg.rewards``,
    ``cfg.scorers.batch_size`` images per reward call."""
    rewards = make_rewards(cfg.rewards, cfg.scorers)
    source = "reward:" + ",".join(r.name for r in rewards)
    rows, skipped, values, n_groups = [], Counter(), [], 0
    batch: list[tuple[Group, list]] = []

    def flush() -> None:
        nonlocal n_groups
        for (g, _), v in zip(batch, _score(rewards, batch)):
            rows.extend(group_rows(g, v, source, flip))
            values.append(v)
            n_groups += 1
        batch.clear()

    for g in groups:
        if isinstance(g, BadGroup):
            skipped[g.reason] += 1
            log.warning("%s: sample %s skipped (%s)", g.shard, g.key, g.reason)
            continue
        images = decode_images(g)
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


def human_preferences(
    cfg: FeedbackConfig, groups, flip
) -> tuple[list[dict], Counter, list[np.ndarray], int, dict]:
    """``reward_preferences``' results from people's labels (``cfg.human``), and what the summary
    records of them."""
    scores = read_human(cfg.human)  # type: ignore[arg-type]  # check(): set with source=human
    good, skipped, bad_keys = [], Counter(), set()
    for g in groups:
        if isinstance(g, BadGroup):
            skipped[g.reason] += 1
            bad_keys.add(g.key)
            log.warning("%s: sample %s skipped (%s)", g.shard, g.key, g.reason)
        else:
            g.jpegs = []  # people's labels need no pixels; a long folder's JPEGs would pile up here
            good.append(g)
    known = {k for g in good for k in g.image_keys}
    unknown = check_unknown(scores, known, cfg.unknown_images, cfg.trajectories, bad_keys)
    rows, values, n_groups, unlabelled_pairs = [], [], 0, 0
    for g in good:
        means, votes, exact = human_group(g, scores)
        g_rows = group_rows(g, means, "human", flip, votes=votes, order=exact)
        k = len(g.image_keys)
        unlabelled_pairs += k * (k - 1) // 2 - len(g_rows)
        if not g_rows:
            skipped["unlabelled"] += 1
            continue
        rows.extend(g_rows)
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


def decide_preferences(cfg: FeedbackConfig) -> dict:
    """The feedback stage's job: decide every pair of ``cfg.trajectories`` and write the preference
    file to ``cfg.out``; returns its summary (as written, with the pair counts)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out}: exists and is not a folder")
    manifest = read_manifest(cfg.trajectories)
    groups = iter_groups(cfg.trajectories, manifest, verify=cfg.verify)
    flip = (cfg.flip_rate, cfg.flip_seed, cfg.flip_by)
    human = None
    if cfg.source == "human":
        rows, skipped, values, n_groups, human = human_preferences(cfg, groups, flip)
        names, source = ["human"], "human"
    else:
        rows, skipped, values, n_groups = reward_preferences(cfg, groups, flip)
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
        # over every scored image; None when there is none, or a reward gave only NaN
        "mean_value": {n: describe(allv[:, c])["mean"] for c, n in enumerate(names)},
        "config": to_dict(cfg),
    }
    written = write_preferences(out, rows, names, summary)
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
    return written
