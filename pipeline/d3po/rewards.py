"""Scripted feedback for D3PO: reward functions that stand in for a person comparing images.

D3PO needs no reward model; these functions are used **only to compare** the K images sampled for one
prompt (the authors' ``compare`` in scripts/rm/train_d3po.py), never as a training signal of their own.
Each takes PIL images and their prompts and returns one float64 value per image, higher = preferred:

| name | value | the authors' code (yk7333/D3PO, d3po_pytorch/rewards.py) |
|---|---|---|
| ``jpeg_compressibility`` | minus the JPEG size at quality 95, in kB (bytes / 1000) | ``jpeg_compressibility`` |
| ``jpeg_incompressibility`` | plus the same size | ``jpeg_incompressibility`` |
| ``brightness`` | mean luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B) in [0, 1] | cf. ``light_reward`` (mean of every channel) |
| ``random`` | a uniform [0, 1) value from the sha256 of the image's pixels: a control, unrelated to anything | none |
| ``aesthetic``, ``pickscore``, ``hpsv2``, ``imagereward`` | ``pipeline.evaluate.scorers`` from a local folder | ``aesthetic_score`` (the others are not the authors') |

The images here are the stored JPEGs of the sample stage decoded to 8-bit RGB (the authors score the
VAE's float output rounded to 8 bit), so a JPEG size is that of re-encoding an image that was a JPEG
once: the same order in practice, not the same kilobytes.

A name with a leading ``-`` is the same reward reversed (``negate``): the check that training on a
reward's negation lowers it. Several rewards combine by **Pareto dominance** (``pareto``): image a beats
b only if it is >= on every reward and > on at least one; any disagreement (or a NaN) is a tie, which
carries no gradient.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.data.flips import is_flipped
from pipeline.errors import UserError
from pipeline.evaluate import scorers
from pipeline.models import DTYPES, pick_device
from pipeline.schema.feedback import REWARD_NAMES, SCORER_REWARDS, SCRIPTED_REWARDS

RewardFn = Callable[[Sequence, Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Reward:
    """A named reward: ``fn(images, prompts) -> float64 [len(images)]``, higher is preferred."""

    name: str
    fn: RewardFn

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> np.ndarray:
        out = np.asarray(self.fn(images, prompts), dtype=np.float64).reshape(-1)
        if out.shape[0] != len(images):
            raise ValueError(f"reward {self.name}: {out.shape[0]} values for {len(images)} images")
        return out


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def brightness(images: Sequence, prompts: Sequence[str] | None = None) -> np.ndarray:
    """Mean luma in [0, 1]: cheap and monotone in what a test paints, so CPU tests know the answer."""
    weights = np.array([0.299, 0.587, 0.114])
    return np.array([float((_rgb(im) @ weights).mean() / 255.0) for im in images])


def random(images: Sequence, prompts: Sequence[str] | None = None) -> np.ndarray:
    """A control: a value fixed by the image's pixels (sha256) but unrelated to any of its properties, so
    feedback from it is a coin toss per pair. An online loop fed it measures how far training alone
    moves the other rewards (the drift to compare a real reward's effect with)."""
    out = []
    for im in images:
        digest = hashlib.sha256(np.ascontiguousarray(np.asarray(im.convert("RGB"))).tobytes()).digest()
        out.append(int.from_bytes(digest[:8], "big") / 2.0**64)
    return np.array(out)


def jpeg_size_kb(image, quality: int = 95) -> float:
    """Size of the image as a JPEG at ``quality``, in kB of 1000 bytes (as the authors divide)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


def jpeg_incompressibility(images: Sequence, prompts: Sequence[str] | None = None) -> np.ndarray:
    return np.array([jpeg_size_kb(im) for im in images])


def jpeg_compressibility(images: Sequence, prompts: Sequence[str] | None = None) -> np.ndarray:
    """Minus the JPEG size: a flat image (few bytes) is preferred to a detailed or noisy one."""
    return -jpeg_incompressibility(images, prompts)


def negate(reward: Reward) -> Reward:
    """The same reward reversed: every decided comparison flips, ties stay ties."""
    base = reward.name[1:] if reward.name.startswith("-") else f"-{reward.name}"
    return Reward(base, lambda images, prompts: -reward(images, prompts))


def _scorer_reward(name: str, path: str, device: str, dtype: str) -> Reward:
    """A scorer of the evaluation stage as a reward."""
    dev, dt = pick_device(device), DTYPES[dtype]
    if name == "aesthetic":
        scorer = scorers.AestheticScorer(path, dev, dt)
    elif name == "imagereward":
        scorer = scorers.ImageRewardScorer(path, dev, dt)
    else:
        scorer = scorers.ClipScorer(name, path, dev, dt, use_logit_scale=name == "pickscore")

    def fn(images: Sequence, prompts: Sequence[str]) -> np.ndarray:
        return scorer.score([im.convert("RGB") for im in images], list(prompts))

    return Reward(name, fn)


def make_reward(
    name: str, scorer_paths: dict[str, str | None] | None = None, device: str = "auto", dtype: str = "fp32"
) -> Reward:
    """The reward called ``name`` (``-name``: its negation). A scorer reward needs its folder in
    ``scorer_paths``; a missing one is a UserError naming the key to give."""
    if name.startswith("-"):
        return negate(make_reward(name[1:], scorer_paths, device, dtype))
    if name in SCRIPTED_REWARDS:
        return Reward(name, globals()[name])
    if name in SCORER_REWARDS:
        path = (scorer_paths or {}).get(name)
        if not path:
            raise UserError(f"reward {name}: give scorers.{name}=FOLDER (a local scorer folder)")
        return _scorer_reward(name, path, device, dtype)
    raise UserError(f"reward {name!r}: unknown; choose from {', '.join(REWARD_NAMES)}")


def pareto(a: np.ndarray, b: np.ndarray) -> int:
    """+1 if ``a`` dominates ``b`` (>= on every reward, > on one), -1 if ``b`` dominates ``a``, else 0 (a
    tie: the rewards disagree, or the values are equal, or one is NaN). The authors' ``compare``."""
    a, b = np.atleast_1d(np.asarray(a, dtype=np.float64)), np.atleast_1d(np.asarray(b, dtype=np.float64))
    if np.all(a >= b) and np.any(a > b):
        return 1
    if np.all(b >= a) and np.any(b > a):
        return -1
    return 0


def flip_unit(group_key: str, i: int, j: int, by: str = "pair") -> str:
    """The key a flip decision hashes: one pair of a group, or every pair of a prompt group at once."""
    if by == "pair":
        return f"{group_key}/{i}-{j}"
    if by == "prompt":
        return f"prompt:{group_key}"
    raise ValueError(f"flip_by {by!r}: expected pair or prompt")


def maybe_flip(
    winner: int, i: int, j: int, group_key: str, rate: float, seed: int, by: str = "pair"
) -> tuple[int, bool]:
    """(winner after flipping, flipped): a decided pair flips when the hash of (its unit, seed) falls
    under ``rate`` (``pipeline.data.flips``), so the same pairs flip in every run, whatever else the
    folder holds; a tie (winner -1) never flips. The expected share of decided pairs flipped is ``rate``."""
    if winner < 0 or not is_flipped(flip_unit(group_key, i, j, by), seed, rate):
        return winner, False
    return (j if winner == i else i), True
