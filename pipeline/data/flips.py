"""Deterministic label flips: a pure function of (unit key, seed, rate).

The same pairs flip on every rank, every epoch, after a resume and at any world size, because the
decision hashes the key instead of drawing from a stream. ``flip_by`` chooses the unit: each pair
on its own (uniform flips), every pair of an annotator (``user``), or every pair of a prompt.
"""

from __future__ import annotations

import hashlib

import numpy as np


def unit_key(pair_key: str, meta: dict, by: str = "pair") -> str:
    if by == "pair":
        return pair_key
    if by == "user":
        return f"user:{meta['user_id']}"
    if by == "prompt":
        return f"prompt:{meta['caption']}"
    raise ValueError(f"flip_by {by!r}: expected pair, user or prompt")


def flip_uniform(key: str, seed: int) -> float:
    """A uniform number in [0, 1) that depends only on (key, seed)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def is_flipped(key: str, seed: int, rate: float) -> bool:
    return rate > 0 and flip_uniform(key, seed) < rate


def flipped_mask(keys: list[str], seed: int, rate: float) -> np.ndarray:
    return np.array([is_flipped(k, seed, rate) for k in keys], dtype=bool)
