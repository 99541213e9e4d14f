"""Read Pick-a-Pic v2 parquet files: list sources, check columns, filter rows, order winner/loser.

A first pass reads only the small metadata columns (no image bytes) of every file and decides which
rows are usable; the kept rows, in source order, are what the encode stage cuts into shards. That
list is a pure function of the input, so every job of an encode array computes the same one.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError

log = logging.getLogger(__name__)

# Pick-a-Pic v2's columns that this project reads or writes, with the types it writes them with (the
# labelling export, pipeline.label.export, and the toy data, tools/toy/make_pickapic.py); reading
# accepts the wider COLUMN_TYPES below
PICKAPIC_FIELDS = [
    ("caption", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
    ("label_1", pa.float64()),
    ("has_label", pa.bool_()),
    ("are_different", pa.bool_()),
    ("user_id", pa.int64()),
    ("ranking_id", pa.int64()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("image_0_uid", pa.string()),
    ("image_1_uid", pa.string()),
    ("model_0", pa.string()),
    ("model_1", pa.string()),
    ("best_image_uid", pa.string()),
]
REQUIRED_COLUMNS = (
    "caption",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "has_label",
    "are_different",
    "user_id",
    "ranking_id",
    "image_0_uid",
    "image_1_uid",
)
OPTIONAL_COLUMNS = ("model_0", "model_1", "best_image_uid")
# Arrow types each column may have (Pick-a-Pic v2's own types first); a column of only nulls is fine
# where the scan turns nulls into a counted skip.
_STRING, _BINARY = (
    (pa.types.is_string, pa.types.is_large_string),
    (pa.types.is_binary, pa.types.is_large_binary),
)
_NUMBER, _INTEGER = (pa.types.is_floating, pa.types.is_integer), (pa.types.is_integer,)
_FLAG = (pa.types.is_boolean, pa.types.is_integer)
COLUMN_TYPES = {
    "caption": ("a string", _STRING, True),
    "jpg_0": ("binary (image bytes)", _BINARY, True),
    "jpg_1": ("binary (image bytes)", _BINARY, True),
    "label_0": ("a number", _NUMBER, True),
    "label_1": ("a number", _NUMBER, True),
    "has_label": ("a bool", _FLAG, True),
    "are_different": ("a bool", _FLAG, True),
    "user_id": ("an integer", _INTEGER, False),
    "ranking_id": ("an integer", _INTEGER, False),
    "image_0_uid": ("a string", _STRING, False),
    "image_1_uid": ("a string", _STRING, False),
    "model_0": ("a string", _STRING, True),
    "model_1": ("a string", _STRING, True),
    "best_image_uid": ("a string", _STRING, True),
}
SCAN_COLUMNS = ("caption", "label_0", "label_1", "has_label", "are_different", "ranking_id")
ID_COLUMNS = ("ranking_id", "user_id", "image_0_uid", "image_1_uid")  # a null one makes the row unusable


def caption_key(caption: str) -> bytes:
    """What identifies a caption's text embedding: the same string gives the same embedding."""
    return hashlib.blake2b(caption.encode(), digest_size=16).digest()


def list_sources(source: str) -> list[Path]:
    """A parquet file, a directory of them (recursively) or a glob; sorted so every job agrees."""
    p = Path(source)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(p.rglob("*.parquet"))
    else:
        files = sorted(Path(f) for f in glob.glob(source, recursive=True) if f.endswith(".parquet"))
    if not files:
        raise UserError(
            f"data.source={source}: no parquet files found (give a .parquet file, a directory or a glob)"
        )
    return files


def check_columns(files: list[Path], extra: list[str] = ()) -> None:
    problems = []
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            problems.append(f"{f}: not a readable parquet file ({e})")
            continue
        missing = [c for c in (*REQUIRED_COLUMNS, *extra) if c not in schema.names]
        if missing:
            problems.append(f"{f}: missing column(s) {', '.join(missing)}")
        problems += [f"{f}: {p}" for p in _type_problems(schema)]
    if problems:
        raise UserError("bad Pick-a-Pic input:\n  " + "\n  ".join(problems))


def _type_problems(schema: pa.Schema) -> list[str]:
    out = []
    for name, (want, checks, null_ok) in COLUMN_TYPES.items():
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if not (any(check(t) for check in checks) or (null_ok and pa.types.is_null(t))):
            out.append(f"column {name} has type {t}, expected {want}")
    return out


@dataclass
class ScanResult:
    files: list[Path]
    rows_per_file: list[int]
    kept: list[tuple[int, int]]  # (file index, row in file) of usable rows, source order
    kept_captions: list[bytes] = field(default_factory=list)  # caption_key of each kept row
    skipped: Counter = field(default_factory=Counter)
    skipped_ids: dict[str, list[int]] = field(default_factory=dict)  # reason -> ranking ids (bad rows only)

    @property
    def rows_read(self) -> int:
        return sum(self.rows_per_file)


def scan(files: list[Path]) -> ScanResult:
    """Drop unlabelled rows, ties, identical images, malformed labels, null captions and null ids."""
    res = ScanResult(files=files, rows_per_file=[], kept=[])
    for fi, f in enumerate(files):
        t = pq.read_table(f, columns=list(dict.fromkeys(SCAN_COLUMNS + ID_COLUMNS)))
        n = t.num_rows
        res.rows_per_file.append(n)
        cap_null = np.asarray(t["caption"].is_null().to_numpy(zero_copy_only=False))
        has_label = np.asarray(t["has_label"].fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
        different = np.asarray(t["are_different"].fill_null(True).to_numpy(zero_copy_only=False), dtype=bool)
        l0 = np.asarray(t["label_0"].fill_null(np.nan).to_numpy(zero_copy_only=False), dtype=float)
        l1 = np.asarray(t["label_1"].fill_null(np.nan).to_numpy(zero_copy_only=False), dtype=float)
        rid = t["ranking_id"].to_pylist()  # None where null
        captions = t["caption"].to_pylist()
        reason = np.full(n, "", dtype=object)
        decisive = ((l0 == 1) & (l1 == 0)) | ((l0 == 0) & (l1 == 1))
        reason[~decisive] = "bad_label"
        reason[(l0 == 0.5) & (l1 == 0.5)] = "tie"
        reason[~different] = "identical_images"
        reason[cap_null] = "null_caption"
        reason[~has_label] = "unlabelled"
        id_null = np.zeros(n, dtype=bool)
        for c in ID_COLUMNS:
            id_null |= np.asarray(t[c].is_null().to_numpy(zero_copy_only=False))
        reason[id_null] = "null_id"
        for r in range(n):
            why = reason[r]
            if why:
                res.skipped[why] += 1
                if why in ("null_caption", "bad_label", "null_id"):
                    if rid[r] is not None:
                        res.skipped_ids.setdefault(why, []).append(int(rid[r]))
                    log.warning("skipping %s row %d (ranking_id %s): %s", f.name, r, rid[r], why)
            else:
                res.kept.append((fi, r))
                res.kept_captions.append(caption_key(captions[r]))
    return res


def read_rows(files: list[Path], refs: list[tuple[int, int]], columns: list[str]) -> list[dict]:
    """The given (file, row) rows with ``columns``, in the order of ``refs``; reads only the row
    groups that hold them."""
    out: dict[tuple[int, int], dict] = {}
    by_file: dict[int, list[int]] = {}
    for fi, r in refs:
        by_file.setdefault(fi, []).append(r)
    for fi, rows in by_file.items():
        pf = pq.ParquetFile(files[fi])
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
        available = set(pf.schema_arrow.names)
        table = pf.read_row_groups(groups, columns=[c for c in columns if c in available])
        offset, base = 0, {}
        for g in groups:
            base[g] = offset
            offset += pf.metadata.row_group(g).num_rows
        for r in rows:
            g = int(np.searchsorted(starts, r, side="right") - 1)
            idx = base[g] + (r - int(starts[g]))
            out[(fi, r)] = {c: table[c][idx].as_py() for c in table.column_names}
    return [out[ref] for ref in refs]


def winner_index(row: dict) -> int:
    """0 when image 0 is preferred (label_0 == 1), else 1."""
    return 0 if row["label_0"] == 1 else 1
