"""The whole loop of the labelling service: two annotators label toy pairs through the HTTP API (one
against the true preference on purpose), export, encode, train Adaptive-DPO, evaluate; the
evaluation's per-annotator audit is made from the trained policy's margins on every training pair
(tools/label_demo.py, the README's "Collect your own preferences").

What this test asserts is the loop's mechanism, exactly: every label reaches the export as given,
every pair reaches the training and the audit, and the audit's numbers are those of the final policy's
margins it writes beside the report (audit_NAME.parquet).
Whether the audit then puts the disagreeing annotator first is a statistical outcome of a small
training (it depends on the model, the data and the host's float kernels); it is measured over seeds
in FINDINGS.md ("The labelling loop's audit"), not asserted here."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.evaluate.minority_report import latest_per_pair
from pipeline.label.people import list_people
from pipeline.label.storage import Database
from pipeline.metrics_log import read_pair_records
from tools import label_demo


@pytest.mark.slow
def test_labels_reach_the_export_the_training_and_the_audit_as_given(tmp_path, tiny_sd15):
    out = tmp_path / "loop"
    rc = label_demo.main(["--out", str(out), "--pairs", "96", "--steps", "12", "--model", str(tiny_sd15)])
    assert rc in (0, 1)  # 1: the audit did not put mallory first (not asserted: see the docstring)
    names = {r["user_id"]: r["name"] for r in list_people(Database(str(out / "labels.db"), create=False))}
    ids = {n: u for u, n in names.items()}

    # the export: every label as the annotator gave it (alice with the truth, mallory against it)
    exported = json.loads((out / "prefs" / "export.json").read_text())
    assert exported["labels"] == exported["rows"] == 96 and exported["choices"] == {"image": 96}
    rows = pq.read_table(out / "prefs" / exported["files"][0]).to_pylist()
    by_user = {n: [r for r in rows if r["user_id"] == ids[n]] for n in ("alice", "mallory")}
    assert 0 < len(by_user["mallory"]) < len(by_user["alice"]) and sum(map(len, by_user.values())) == 96
    assert all(r["label_0"] == r["true_label_0"] for r in by_user["alice"])
    assert all(r["label_0"] == 1.0 - r["true_label_0"] for r in by_user["mallory"])

    # the training saw every labelled pair, under its annotator's id
    rec = latest_per_pair(read_pair_records(out / "run"))
    users = rec["user_id"].astype(int)
    assert len(users) == 96 and {n: int((users == ids[n]).sum()) for n in by_user} == {
        n: len(v) for n, v in by_user.items()
    }

    # the audit: both annotators, with their pairs and the share of them the trained policy contradicts,
    # read from the final policy's margin on each of the 96 training pairs (4 draws each)
    report = json.loads((out / "report" / "report.json").read_text())["minority"]["adaptive"]
    assert report["audit_margins"] == "final" and report["flip_rate_source"] == "posthoc_final"
    final = pq.read_table(report["audit_pairs_file"]).to_pydict()
    assert sorted(final["key"]) == sorted(rec["key"].tolist())
    fu, fh = np.array(final["user_id"]), np.array(final["h"])
    assert not any(final["flipped"]) and np.isfinite(fh).all() and (fh != 0).all()
    audit = report["annotators"]
    assert sorted(a["user_id"] for a in audit) == sorted(ids.values())
    for a in audit:
        mine = users == a["user_id"]
        assert a["pairs"] == int(mine.sum()) == int((fu == a["user_id"]).sum())
        assert a["policy_disagrees"] == pytest.approx(float(np.mean(fh[fu == a["user_id"]] < 0)), abs=1e-12)
        assert a["flipped_share"] == 0.0  # nothing flipped by the trainer: mallory's labels are her own
