"""The whole loop of the labelling service: two annotators label toy pairs through the HTTP API (one
against the true preference on purpose), export, encode, train Adaptive-DPO, evaluate; the
evaluation's per-annotator audit, made from the trained run's per-pair records, lists the disagreeing
annotator first (tools/label_demo.py, the README's "Collect your own preferences")."""

from __future__ import annotations

import json

import pytest

from pipeline.label.people import list_people
from pipeline.label.storage import Database
from tools import label_demo


@pytest.mark.slow
def test_labels_to_a_trained_run_whose_audit_puts_the_disagreeing_annotator_first(tmp_path):
    out = tmp_path / "loop"
    rc = label_demo.main(["--out", str(out), "--pairs", "160", "--steps", "40"])
    audit = json.loads((out / "report" / "report.json").read_text())["minority"]["adaptive"]["annotators"]
    names = {r["user_id"]: r["name"] for r in list_people(Database(str(out / "labels.db"), create=False))}
    assert rc == 0 and [names[a["user_id"]] for a in audit] == ["mallory", "alice"], audit
    exported = json.loads((out / "prefs" / "export.json").read_text())
    assert exported["labels"] == exported["rows"] == 160 and exported["choices"] == {"image": 160}
    pairs = {a["user_id"]: a["pairs"] for a in audit}
    assert sum(pairs.values()) == 160 and pairs[2] < pairs[1]  # mallory labelled the smaller share
