"""D3PO preference files: which of two sampled images of one prompt is preferred, by scripted rewards or
by people, for every pair of every prompt group of a trajectory folder.

Written by the feedback stage (``pipeline.d3po.feedback``) into its output folder, read by the D3PO
trainer (``load_preferences``):

``preferences.parquet`` (format ``d3po-preferences`` v1), one row per prompt group ``key`` and
unordered image pair ``i < j`` of its K images, groups in the trajectory folder's order (manifest
shards, then tar order), pairs in (i, j) order:

| column | type | meaning |
|---|---|---|
| ``key`` | string | the prompt group's sample key in the trajectory shards |
| ``prompt``, ``prompt_index`` | string, int64 | from the group's json (-1 when it has none) |
| ``i``, ``j`` | int32 | image indices within the group, ``i < j`` (``KEY.img{i}.jpg``, trajectory ``i``) |
| ``image_i``, ``image_j`` | string | image keys, ``KEY/i`` (the ids people's labels name) |
| ``winner`` | int32 | ``i`` or ``j``: the preferred image, **after** any flip; ``-1``: a tie (no gradient) |
| ``flipped`` | bool | the decided preference was reversed on purpose (``flip_rate``); the original winner is the other image |
| ``values_i``, ``values_j`` | list<float64> | what was compared, one value per name in the file's ``names`` (the rewards, or ``human``: the image's mean score) |
| ``votes_i``, ``votes_j`` | int32 | human mode: the scores averaged for the image; reward mode: 0 |
| ``source`` | string | ``reward:<name>,<name>...`` or ``human`` |

The parquet's key-value metadata holds ``format``, ``version`` and ``names`` (a JSON list).
``summary.json`` (written after the parquet, each by an atomic rename) counts groups, skipped groups by
reason, pairs, decided, ties, flipped, the mean value per name over every scored image, and the
parquet's sha256: a parquet whose hash is not the summary's (a run killed between the two renames) is
refused by ``load_preferences``. Nothing in either file depends on the time or the machine, so the same
inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.shards import sha256_file
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, write_json_atomic

FORMAT = "d3po-preferences"
VERSION = 1
PARQUET = "preferences.parquet"
SUMMARY = "summary.json"
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("prompt", pa.string()),
        ("prompt_index", pa.int64()),
        ("i", pa.int32()),
        ("j", pa.int32()),
        ("image_i", pa.string()),
        ("image_j", pa.string()),
        ("winner", pa.int32()),
        ("flipped", pa.bool_()),
        ("values_i", pa.list_(pa.float64())),
        ("values_j", pa.list_(pa.float64())),
        ("votes_i", pa.int32()),
        ("votes_j", pa.int32()),
        ("source", pa.string()),
    ]
)


def table(rows: list[dict], names: list[str]) -> pa.Table:
    cols = {f.name: [r[f.name] for r in rows] for f in SCHEMA}
    t = pa.Table.from_pydict(cols, schema=SCHEMA)
    meta = {"format": FORMAT, "version": str(VERSION), "names": json.dumps(names)}
    return t.replace_schema_metadata(meta)


def parquet_bytes(t: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd", row_group_size=65536)
    return buf.getvalue()


def counts(rows: list[dict]) -> dict:
    decided = sum(r["winner"] >= 0 for r in rows)
    return {
        "pairs": len(rows),
        "decided": decided,
        "ties": len(rows) - decided,
        "flipped": sum(r["flipped"] for r in rows),
    }


def write_preferences(out_dir: str | Path, rows: list[dict], names: list[str], summary: dict) -> dict:
    """Write ``preferences.parquet`` then ``summary.json`` (each tmp + fsync + rename). Returns the
    summary as written, with the pair counts and the parquet's size and sha256 added."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(f".{PARQUET}.tmp-*"), *out.glob(f".{SUMMARY}.tmp-*")]:
        stale.unlink(missing_ok=True)  # left by a run killed while writing (one writer per folder)
    data = parquet_bytes(table(rows, names))
    atomic_write_bytes(out / PARQUET, data)
    summary = {
        "format": FORMAT,
        "version": VERSION,
        **summary,
        **counts(rows),
        "names": names,
        "file": PARQUET,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_json_atomic(out / SUMMARY, summary)
    return summary


def load_preferences(out_dir: str | Path) -> tuple[pa.Table, dict]:
    """(table, summary) of a feedback folder; refuses a parquet that is not the one its summary names."""
    d = Path(out_dir)
    sp, pp = d / SUMMARY, d / PARQUET
    if not sp.is_file() or not pp.is_file():
        raise UserError(f"{d}: no {SUMMARY} and {PARQUET} (run stages.feedback)")
    summary = json.loads(sp.read_text())
    if summary.get("format") != FORMAT or summary.get("version") != VERSION:
        raise UserError(f"{sp}: not a {FORMAT} v{VERSION} summary")
    if sha256_file(pp) != summary.get("sha256"):
        raise UserError(
            f"{pp}: not the file {SUMMARY} describes (a run was interrupted); run stages.feedback again"
        )
    return pq.read_table(pp), summary
