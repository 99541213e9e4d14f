"""Shard format v2: each caption's text embedding stored once, in the shard where it first occurs; a
damaged text file is a counted substitution like a damaged shard, a missing one a clear refusal, and
a v1 shard folder is refused with a message saying to re-encode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.data.shards import load_manifest
from pipeline.data.text_store import TextStore, plan_texts, text_name, write_texts
from pipeline.errors import UserError
from pipeline.metrics_log import read_metrics
from tests.helpers.run import train


def test_each_caption_goes_to_the_shard_where_it_first_occurs():
    keys = [b"a", b"b", b"a", b"c", b"b", b"d", b"a"]
    plan = plan_texts(keys, [(0, 3), (3, 6), (6, 7)])
    assert plan.first_seen == [[0, 1], [3, 5], []]
    assert plan.refs == [(0, 0), (0, 1), (0, 0), (1, 0), (0, 1), (1, 1), (0, 0)]


def test_a_damaged_text_file_names_itself_and_is_not_retried(tmp_path):
    manifest = {"text_shape": [77, 8], "pooled_dim": None}
    txt = np.arange(3 * 77 * 8, dtype=np.float16).reshape(3, 77, 8)
    write_texts(tmp_path, 0, txt, None)
    store = TextStore(tmp_path, manifest)
    np.testing.assert_array_equal(store.lookup([0, 2])[0], txt[2])
    with pytest.raises(ValueError, match=r"text reference \[0, 3\] is outside"):
        store.lookup([0, 3])
    p = tmp_path / text_name(0)
    p.write_bytes(p.read_bytes()[:2000])  # truncated
    store = TextStore(tmp_path, manifest)
    for _ in range(2):
        with pytest.raises(ValueError, match=f"text store {p} is unreadable"):
            store.lookup([0, 0])
    assert list(store._bad) == [text_name(0)]


def test_a_v1_shard_folder_is_refused_with_a_re_encode_message(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "pickapic-dpo-shards", "version": 1}))
    with pytest.raises(UserError, match="format v1 .* re-encode them"):
        load_manifest(tmp_path)


@pytest.mark.slow
def test_training_substitutes_pairs_of_a_damaged_text_file_and_refuses_a_missing_one(shards64, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(shards64, d)
    p = d / text_name(1)  # the captions first seen in shard 1
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    out = tmp_path / "run"
    r = train(d, out, "train.max_steps=8", "checkpoint.export=false", "checkpoint.every=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"text store {p} is unreadable" in r.stderr
    m = read_metrics(out / "metrics.jsonl")
    assert sum(x["substituted"] for x in m) > 0 and all(np.isfinite(x["loss"]) for x in m)
    p.unlink()
    r = train(d, tmp_path / "run2", "train.max_steps=2")
    assert r.returncode == 2 and f"files listed in the manifest are missing: {p}" in r.stderr
