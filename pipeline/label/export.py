"""Export the labels: Pick-a-Pic v2 parquet for ``stages.encode`` and per-image preferences for D3PO.

Pick-a-Pic rows (``labels-NNNNN.parquet``), one per label of a pair item, in the order the labels
were stored: ``caption``, ``jpg_0``/``jpg_1`` (the item's image 0 and 1, whatever side they were
shown on), ``label_0``/``label_1`` (1/0 for the chosen image, 0.5/0.5 for a tie), ``has_label``
(false for a skip, whose labels are 0/0, as Pick-a-Pic writes unlabelled rows), ``are_different``,
``user_id``, ``ranking_id`` (the label's id, unique in the database), ``created_at`` (when it was
answered, UTC), ``image_0_uid``/``image_1_uid``, ``model_0``/``model_1`` (when the source has them),
``best_image_uid``; then this service's own columns (``annotator``, ``item_key``, ``choice``,
``shown_at``, ``duration_ms``, ``is_check``, ``source_ranking_id``) and every other plain column the
source row had (e.g. the toy world's ``true_label_0``). ``stages.encode`` reads it unchanged and
drops ties and skips, as it does Pick-a-Pic's. A "best of K" label becomes K-1 rows sharing its
ranking_id: the chosen image against each other one (a tie or skip: image 0 against each other one,
0.5/0.5 or unlabelled).

``image_preferences.jsonl`` (the contract with the D3PO feedback), one JSON object per line and
judged image: ``{"prompt_key", "image_key", "user_id", "annotator", "score", "created_at"}`` with
score 1 for the chosen image and 0 for each other image of the item, 0.5 for every image of a tie;
skips write nothing.

``flip_rates.json``: each annotator's flip rate against the consensus, estimated from the labels alone
(``pipeline.label.reliability``: Dawid-Skene EM over items judged by two or more people and check
items, shrunk toward the global rate for annotators with few labels), most doubtful first;
``objective.flip_rates`` gives Robust-DPO each pair's own rate from it. Without redundancy (one label
per item, no check items) every rate is the global prior: nothing is measured.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.data import pickapic
from pipeline.errors import UserError
from pipeline.io import write_json_atomic
from pipeline.label import reliability
from pipeline.label.sources import ImageReader
from pipeline.label.storage import Database, label_records

# Pick-a-Pic v2's columns, then this service's own
PICKAPIC_FIELDS = [
    *pickapic.PICKAPIC_FIELDS,
    ("annotator", pa.string()),
    ("item_key", pa.string()),
    ("choice", pa.string()),
    ("shown_at", pa.timestamp("us", tz="UTC")),
    ("duration_ms", pa.int64()),
    ("is_check", pa.bool_()),
    ("source_ranking_id", pa.int64()),
]
_META_OWN = {"model_0", "model_1", "source_ranking_id", "source_user_id"}
PREFERENCES = "image_preferences.jsonl"
FLIP_RATES = "flip_rates.json"  # pipeline.label.reliability's estimate: objective.flip_rates


def pair_rows(kind: str, k: int, choice: str) -> list[tuple[int, int, float, float, bool]]:
    """(image a, image b, label_a, label_b, has_label) rows of one label."""
    if kind == "pair":
        if choice == "skip":
            return [(0, 1, 0.0, 0.0, False)]
        if choice == "tie":
            return [(0, 1, 0.5, 0.5, True)]
        c = int(choice)
        return [(0, 1, float(c == 0), float(c == 1), True)]
    if choice in ("tie", "skip"):
        lab = (0.5, 0.5, True) if choice == "tie" else (0.0, 0.0, False)
        return [(0, j, *lab) for j in range(1, k)]
    c = int(choice)
    return [(c, j, 1.0, 0.0, True) for j in range(k) if j != c]


def image_scores(k: int, choice: str) -> list[tuple[int, float]]:
    """(image index, score) of one label for the D3PO feedback."""
    if choice == "skip":
        return []
    if choice == "tie":
        return [(j, 0.5) for j in range(k)]
    c = int(choice)
    return [(j, 1.0 if j == c else 0.0) for j in range(k)]


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "export.json").is_file())):
        raise UserError(
            f"--out {out}: exists and is not an earlier export (no export.json): give a new or empty folder"
        )


def export(
    db: Database,
    out: str | Path,
    include_checks: bool = True,
    rows_per_file: int = 1000,
    online_round: int | None = None,
) -> dict:
    """Write the export to ``out`` (replacing an earlier export there, atomically: the new one is
    written beside it and swapped in when complete). ``online_round``: that round's labels only
    (``pipeline.label.rounds``). Returns the counts written to export.json."""
    out = Path(out)
    _check_out(out)
    everything = label_records(db)
    if online_round is not None:
        everything = [r for r in everything if r["meta"].get("online_round") == online_round]
    labels = [r for r in everything if include_checks or not r["is_check"]]
    extra = sorted({k for r in labels for k in r["meta"] if k not in _META_OWN})
    reader = ImageReader()
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def image(rec: dict, j: int) -> bytes:
        try:
            return reader.read(rec["refs"][j])
        except (OSError, KeyError, IndexError, ValueError) as e:
            raise UserError(
                f"item {rec['item_key']}: image {j} is not readable at {rec['refs'][j]} ({e}); "
                "serve the campaign again with source=<its new place> to update the references"
            ) from e

    rows, files, choices, n_rows = [], [], Counter(), 0

    def flush() -> None:
        nonlocal rows
        if not rows:
            return
        fields = PICKAPIC_FIELDS + [(c, None) for c in extra]
        cols = {name: [r.get(name) for r in rows] for name, _ in fields}
        arrays = [
            pa.array(cols[name], type=t) if t is not None else pa.array(cols[name]) for name, t in fields
        ]
        path = tmp / f"labels-{len(files):05d}.parquet"
        pq.write_table(pa.Table.from_arrays(arrays, names=[n for n, _ in fields]), path, row_group_size=256)
        files.append(path.name)
        rows = []

    with open(tmp / PREFERENCES, "w") as prefs:
        for rec in tqdm(labels, desc="export", unit="label", disable=len(labels) < 1000):
            choice, k, meta = rec["choice"], len(rec["images"]), rec["meta"]
            choices[choice if choice in ("tie", "skip") else "image"] += 1
            created = _utc(rec["answered_at"])
            for a, b, la, lb, has in pair_rows(rec["kind"], k, choice):
                in_order = (a, b) == (0, 1)  # the source's per-image columns describe images 0 and 1
                row = {
                    "caption": rec["caption"],
                    "jpg_0": image(rec, a),
                    "jpg_1": image(rec, b),
                    "label_0": la,
                    "label_1": lb,
                    "has_label": has,
                    "are_different": True,
                    "user_id": int(rec["user_id"]),
                    "ranking_id": int(rec["label_id"]),
                    "created_at": created,
                    "image_0_uid": rec["images"][a],
                    "image_1_uid": rec["images"][b],
                    "model_0": meta.get("model_0") if in_order else None,
                    "model_1": meta.get("model_1") if in_order else None,
                    "best_image_uid": rec["images"][a]
                    if la == 1.0
                    else (rec["images"][b] if lb == 1.0 else ""),
                    "annotator": rec["annotator"],
                    "item_key": rec["item_key"],
                    "choice": choice,
                    "shown_at": _utc(rec["shown_at"]),
                    "duration_ms": int(rec["duration_ms"]),
                    "is_check": rec["is_check"],
                    "source_ranking_id": meta.get("source_ranking_id"),
                }
                row.update({c: meta.get(c) if in_order else None for c in extra})
                rows.append(row)
                n_rows += 1
                if len(rows) >= rows_per_file:
                    flush()
            for j, score in image_scores(k, choice):
                line = {
                    "prompt_key": rec["prompt_key"],
                    "image_key": rec["images"][j],
                    "user_id": int(rec["user_id"]),
                    "annotator": rec["annotator"],
                    "score": score,
                    "created_at": created.isoformat(),
                }
                prefs.write(json.dumps(line) + "\n")
        flush()
    # per-annotator flip rates from the redundancy in these labels (R >= 2 per item, check items), for
    # Robust-DPO's objective.flip_rates; every label counts here, check items included (they anchor it)
    rel = reliability.estimate(everything)
    write_json_atomic(tmp / FLIP_RATES, rel.as_dict())
    summary = {
        "labels": len(labels),
        "rows": n_rows,
        "choices": dict(choices),
        "annotators": len({r["annotator"] for r in labels}),
        "include_checks": include_checks,
        "online_round": online_round,
        "files": files,
        "preferences": PREFERENCES,
        "flip_rates_file": FLIP_RATES,
        "global_flip_rate": rel.global_rate,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    (tmp / "export.json").write_text(json.dumps(summary, indent=1) + "\n")
    old = out.with_name(out.name + ".old-export")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return summary
