"""AUROC against a brute-force pairwise count, flipped share per bin by hand, deterministic flips."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.flips import flip_uniform, flipped_mask, is_flipped, unit_key
from pipeline.minority import _rank_average, auroc, flipped_share_by_bin


def _brute_auroc(s, y):
    pos, neg = s[y], s[~y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 12, 300).astype(float)  # many ties
    y = rng.random(300) < 0.3
    assert auroc(s, y) == pytest.approx(_brute_auroc(s, y), abs=1e-12)


def _brute_ranks(s):
    """1-based ranks by definition: 1 + (number below) + (number of others equal) / 2."""
    below = (s[None, :] < s[:, None]).sum(axis=1)
    equal = (s[None, :] == s[:, None]).sum(axis=1) - 1
    return 1.0 + below + equal / 2.0


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_auroc_and_ranks_match_the_pairwise_definition_on_random_ties(seed):
    """Random sizes (2..400), tie densities from all-distinct to all-equal, NaN scores, both signs."""
    rng = np.random.default_rng(100 + seed)
    for _ in range(20):
        n = int(rng.integers(2, 400))
        levels = int(rng.choice([1, 2, 5, 50, 10**9]))
        s = rng.integers(-levels, levels + 1, n).astype(float) * rng.choice([1.0, 0.25])
        assert np.array_equal(_rank_average(s), _brute_ranks(s))
        y = rng.random(n) < rng.uniform(0.05, 0.95)
        s[rng.random(n) < 0.1] = np.nan
        ok = ~np.isnan(s)
        if y[ok].all() or not y[ok].any():
            assert np.isnan(auroc(s, y))
            continue
        assert auroc(s, y) == pytest.approx(_brute_auroc(s[ok], y[ok]), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc([0.1, 0.9], [False, True]) == 1.0
    assert auroc([0.9, 0.1], [False, True]) == 0.0
    assert auroc([0.5, 0.5], [False, True]) == 0.5
    assert np.isnan(auroc([0.1, 0.2], [True, True]))
    assert auroc([np.nan, 0.1, 0.9], [True, False, True]) == 1.0  # NaN (warm-up) scores are dropped


def test_flipped_share_by_bin_by_hand():
    """u = 0..9, flipped = the top three. Uniform bins of width 4.5 (2 bins): [0, 4.5) has 5 pairs,
    no flips; [4.5, 9] has 5 pairs, 3 flipped -> 0.6."""
    u = np.arange(10, dtype=float)
    flipped = u >= 7
    b = flipped_share_by_bin(u, flipped, bins=2, strategy="uniform")
    assert [x["n"] for x in b] == [5, 5]
    assert [x["flipped_share"] for x in b] == [0.0, 0.6]
    q = flipped_share_by_bin(u, flipped, bins=5, strategy="quantile")
    assert [x["n"] for x in q] == [2, 2, 2, 2, 2]
    assert [x["flipped_share"] for x in q] == [0.0, 0.0, 0.0, 0.5, 1.0]


def test_flips_are_deterministic_and_hit_the_rate():
    keys = [f"pair{i:06d}" for i in range(100_000)]
    for rate in (0.1, 0.2, 0.3):
        m = flipped_mask(keys, seed=7, rate=rate)
        assert abs(m.mean() - rate) < 0.01
        assert np.array_equal(
            m, flipped_mask(keys, seed=7, rate=rate)
        )  # every rank, every epoch, every resume
    # nested: a pair flipped at 10 % stays flipped at 20 % (same uniform draw)
    m10, m20 = flipped_mask(keys, 7, 0.1), flipped_mask(keys, 7, 0.2)
    assert not (m10 & ~m20).any()
    assert not np.array_equal(m10, flipped_mask(keys, 8, 0.1))
    assert not is_flipped("x", 0, 0.0) and 0 <= flip_uniform("x", 0) < 1


def test_structured_flip_units():
    meta = {"user_id": 42, "caption": "a red cat"}
    assert unit_key("k1", meta, "user") == unit_key("k2", meta, "user") == "user:42"
    assert unit_key("k1", meta, "prompt") == "prompt:a red cat"
    assert unit_key("k1", meta, "pair") == "k1"
    with pytest.raises(ValueError, match="flip_by"):
        unit_key("k1", meta, "annotator")
