"""Per-annotator loss weights (pipeline/data/annotator_weights.py, tools/annotator_weights.py): the
weights against hand-computed ones, the counts against the rows the encoder keeps, the file's refusals,
the device lookup. That the trainer multiplies each pair's loss by its weight: tests/test_train.py."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.annotator_weights import (
    AnnotatorWeights,
    compute_weights,
    label_counts,
    write_weights,
)
from pipeline.errors import ConfigError, UserError
from pipeline.schema.train import TrainConfig
from tools import annotator_weights as tool
from tools.toy.make_pickapic import make_rows, write_parquet


def test_weights_cap_each_annotator_and_keep_the_mean_step():
    # 1, 3 and 12 labels, cap 3 (the median): raw weights 1, 1, 3/12; sum n*raw = 1 + 3 + 3 = 7 of 16
    # pairs, so the scale is 16/7: weights 16/7, 16/7, 4/7
    counts = Counter({5: 1, 6: 3, 7: 12})
    w, cap = compute_weights(counts)
    assert cap == 3
    assert w == pytest.approx({5: 16 / 7, 6: 16 / 7, 7: 4 / 7}, rel=1e-12)
    assert sum(counts[u] * w[u] for u in w) / sum(counts.values()) == pytest.approx(1.0)
    # the busy annotator's labels together weigh what the cap's worth of a light one's do
    assert counts[7] * w[7] == pytest.approx(3 * w[6])
    w2, _ = compute_weights(counts, cap=100)  # nobody over the cap: every weight 1
    assert w2 == {5: 1.0, 6: 1.0, 7: 1.0}
    with pytest.raises(UserError, match="cap"):
        compute_weights(counts, cap=0)
    with pytest.raises(UserError, match="no usable"):
        compute_weights(Counter())


def test_counts_are_the_rows_the_encoder_keeps(tmp_path):
    rows = make_rows(60, seed=3, tie_rate=0.2, unlabelled_rate=0.1, identical_rate=0.1)
    write_parquet(rows, tmp_path / "pq", rows_per_file=25)
    kept = Counter(
        r["user_id"]
        for r in rows
        if r["has_label"] and r["are_different"] and {r["label_0"], r["label_1"]} == {0.0, 1.0}
    )
    assert 0 < sum(kept.values()) < 60  # ties, unlabelled and identical rows were drawn and dropped
    assert label_counts(str(tmp_path / "pq")) == kept


def test_the_file_round_trips_and_is_looked_up_on_the_device(tmp_path):
    f = tmp_path / "w.json"
    doc = write_weights(Counter({5: 1, 6: 3, 7: 12}), None, f)
    assert doc["pairs"] == 16 and doc["cap"] == 3
    # Kish's effective size: (sum over pairs of w)^2 / sum of w^2 = 16^2 / (1 (16/7)^2 + 3 (16/7)^2 + 12 (4/7)^2)
    assert doc["effective_pairs"] == pytest.approx(256 / (4 * 256 / 49 + 12 * 16 / 49))
    t = AnnotatorWeights.from_file(f)
    got = t.lookup(torch.tensor([7, 5, 99, 6], dtype=torch.int64))
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([4 / 7, 16 / 7, 1.0, 16 / 7])  # 99: not in the file, weight 1


@pytest.mark.parametrize(
    "content,msg",
    [
        (None, "no such file"),
        ("{not json", "not an annotator_weights.json"),
        (json.dumps({"format": "other", "annotators": []}), "format"),
        (json.dumps({"format": "annotator_weights/1", "annotators": [{"user_id": 1, "weight": -1}]}), ">= 0"),
        (
            json.dumps(
                {
                    "format": "annotator_weights/1",
                    "annotators": [{"user_id": 1, "weight": 1}, {"user_id": 1, "weight": 2}],
                }
            ),
            "appears twice",
        ),
    ],
)
def test_a_bad_file_is_refused_with_the_key_named(tmp_path, content, msg):
    f = tmp_path / "w.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(UserError, match=msg) as e:
        AnnotatorWeights.from_file(f)
    assert str(e.value).startswith(f"data.annotator_weights={f}")


def test_the_tool_writes_the_file_and_names_a_bad_source(tmp_path, capsys):
    write_parquet(make_rows(40, seed=4, tie_rate=0, unlabelled_rate=0, identical_rate=0), tmp_path / "pq", 20)
    assert tool.main(["--data", str(tmp_path / "pq"), "--out", str(tmp_path / "w.json")]) == 0
    doc = json.loads((tmp_path / "w.json").read_text())
    assert doc["pairs"] == 40 and math.isclose(
        sum(a["labels"] * a["weight"] for a in doc["annotators"]) / 40, 1.0, rel_tol=1e-12
    )
    assert tool.main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.json")]) == 2
    assert "no parquet files found" in capsys.readouterr().err


def test_trajectory_objectives_refuse_annotator_weights():
    base = ["data.shards=s", "output.dir=o", "data.annotator_weights=w.json"]
    assert load_config(TrainConfig, None, base).data.annotator_weights == "w.json"  # pair objectives
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, [*base, "objective.name=d3po"])
    assert [m.split(":")[0] for m in e.value.errors] == ["data.annotator_weights"]
