"""What there is to label: items from a Pick-a-Pic-format parquet or from a sampling folder, and the
bytes of their images.

An item is what one annotator judges at once: a caption and its images, either a pair (Pick-a-Pic
rows; or every pair of a prompt's samples) or the K samples of one prompt ("pick the best of K",
D3PO's human mode). Each image carries a reference into the source (a parquet file, row and column,
or a file inside the sampling folder); the references are stored in the database when the campaign
loads, and the web app serves an image by (item key, index) through them, never by a path taken from
a request.

Sampling folder format (written by the sampling stage when a run is complete, through
``write_samples_index``): ``images.jsonl``, one JSON object per line, ``{"image_key": str,
"prompt_key": str, "caption": str, "k": int, "file": str}``, ``file`` the image's path relative to
the folder (the sample stage writes ``images/<KEY>_<k>.jpg``), ``k`` the index of the image within its
prompt group (0..K-1).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import pickapic
from pipeline.data.shards import pair_key
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, read_jsonl

SAMPLES_INDEX = "images.jsonl"
SAMPLES_INDEX_FIELDS = {"image_key": str, "prompt_key": str, "caption": str, "k": int, "file": str}
# Pick-a-Pic columns the export writes itself (or that are image bytes); every other scalar column of
# a source row (model_0 and model_1 among them) is kept in the item's metadata and carried to the
# export (e.g. the toy world's true_label_0)
_OWN_COLUMNS = {name for name, _ in pickapic.PICKAPIC_FIELDS} - {"model_0", "model_1"}


@dataclass
class Item:
    key: str  # stable: the same source row or prompt group gives the same key in every run
    kind: str  # "pair" or "best_of_k"
    caption: str
    prompt_key: str
    images: list[str]  # image keys (Pick-a-Pic: image uids), in source order: image 0 = jpg_0
    refs: list[dict]  # where each image's bytes are, same order
    meta: dict = field(default_factory=dict)  # source columns carried to the export
    answer: int | None = None  # index of the known better image (check candidates only)
    is_check: bool = False


@dataclass
class Source:
    path: str
    kind: str  # "pickapic" or "samples"
    items: list[Item]
    skipped: Counter
    fingerprint: str  # changes when a source file changes


def prompt_key_of(caption: str) -> str:
    """Pick-a-Pic has no prompt id: a prompt is its caption."""
    return hashlib.sha1(caption.encode()).hexdigest()[:16]


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _scalar_columns(path: Path) -> list[str]:
    """Columns of plain values (no image bytes, lists or structs) a row's metadata may keep."""
    out = []
    for f in pq.read_schema(path):
        t = f.type
        if f.name in _OWN_COLUMNS:
            continue
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t):
            out.append(f.name)
        elif pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_timestamp(t):
            out.append(f.name)
    return out


def _jsonable(v):
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if np.isfinite(v) else None
    return str(v)  # timestamps


def _answer_of(value, has_label: bool, column: str) -> int | None:
    """1 -> image 0 is better, 0 -> image 1; anything else (a tie, no label) is no known answer."""
    if value is None or (column in ("label_0", "label_1") and not has_label):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    win0 = {1.0: 0, 0.0: 1}.get(v)
    if win0 is None:
        return None
    return win0 if column != "label_1" else 1 - win0


def _pickapic_items(source: str, check_column: str) -> tuple[list[Item], Counter, list[Path]]:
    files = pickapic.list_sources(source)
    pickapic.check_columns(files)
    items, skipped, seen = [], Counter(), set()
    for fi, f in enumerate(files):
        n = pq.ParquetFile(f).metadata.num_rows
        extra = _scalar_columns(f)
        cols = [
            "caption",
            "has_label",
            "are_different",
            "ranking_id",
            "user_id",
            "image_0_uid",
            "image_1_uid",
            "label_0",
            "label_1",
            *extra,
        ]
        if check_column not in cols and check_column in pq.read_schema(f).names:
            cols.append(check_column)
        rows = pickapic.read_rows(files, [(fi, r) for r in range(n)], cols)
        where = str(f.resolve())
        for r, row in enumerate(rows):
            if row["caption"] is None:
                skipped["null_caption"] += 1
                continue
            if row["are_different"] is False:
                skipped["identical_images"] += 1
                continue
            if not row["image_0_uid"] or not row["image_1_uid"] or row["ranking_id"] is None:
                skipped["missing_ids"] += 1
                continue
            key = pair_key(row["ranking_id"], row["image_0_uid"], row["image_1_uid"])
            if key in seen:
                skipped["duplicate_row"] += 1
                continue
            seen.add(key)
            meta = {c: _jsonable(row[c]) for c in extra}
            meta["source_ranking_id"] = int(row["ranking_id"])
            meta["source_user_id"] = _jsonable(row["user_id"])
            items.append(
                Item(
                    key=key,
                    kind="pair",
                    caption=row["caption"],
                    prompt_key=prompt_key_of(row["caption"]),
                    images=[row["image_0_uid"], row["image_1_uid"]],
                    refs=[{"parquet": where, "row": r, "column": f"jpg_{j}"} for j in (0, 1)],
                    meta=meta,
                    answer=_answer_of(row.get(check_column), bool(row["has_label"]), check_column),
                )
            )
    return items, skipped, files


def _read_samples_index(folder: Path) -> list[dict]:
    """Validate every line of images.jsonl; the message names the line."""
    path = folder / SAMPLES_INDEX
    root = folder.resolve()
    recs, keys = [], set()
    for no, rec in read_jsonl(path):
        for k, t in SAMPLES_INDEX_FIELDS.items():
            if not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool):
                raise UserError(f"{path}:{no}: field {k!r} must be a {t.__name__}, got {rec.get(k)!r}")
        target = (root / rec["file"]).resolve()
        if not target.is_relative_to(root):
            raise UserError(f"{path}:{no}: file {rec['file']!r} is outside the sampling folder")
        if not target.is_file():
            raise UserError(f"{path}:{no}: file {rec['file']!r} does not exist")
        if rec["image_key"] in keys:
            raise UserError(f"{path}:{no}: image_key {rec['image_key']!r} appears twice")
        keys.add(rec["image_key"])
        recs.append({**{k: rec[k] for k in SAMPLES_INDEX_FIELDS}, "path": str(target)})
    if not recs:
        raise UserError(f"{path}: no images listed")
    return recs


def write_samples_index(folder: Path, records: list[dict]) -> Path:
    """Write ``folder``'s ``images.jsonl`` (atomically): one line per record, its fields those of
    ``SAMPLES_INDEX_FIELDS`` (sorted keys), in the order given."""
    lines = [json.dumps({k: rec[k] for k in SAMPLES_INDEX_FIELDS}, sort_keys=True) for rec in records]
    atomic_write_bytes(Path(folder) / SAMPLES_INDEX, ("\n".join(lines) + "\n").encode())
    return Path(folder) / SAMPLES_INDEX


def _sample_items(folder: Path, mode: str) -> tuple[list[Item], Counter]:
    groups: dict[str, list[dict]] = {}
    for rec in _read_samples_index(folder):
        groups.setdefault(rec["prompt_key"], []).append(rec)
    items, skipped = [], Counter()
    for pk, recs in groups.items():
        recs.sort(key=lambda r: r["k"])
        if len(recs) < 2:
            skipped["single_image_prompt"] += 1
            continue
        if len({r["caption"] for r in recs}) > 1:
            raise UserError(f"{folder / SAMPLES_INDEX}: prompt_key {pk!r} has images with different captions")
        refs = [{"file": r["path"]} for r in recs]
        keys = [r["image_key"] for r in recs]
        if mode == "best_of_k":
            key = "k" + hashlib.sha1(("\0".join([pk, *keys])).encode()).hexdigest()[:19]
            items.append(Item(key, "best_of_k", recs[0]["caption"], pk, keys, refs))
            continue
        for i in range(len(recs)):
            for j in range(i + 1, len(recs)):
                key = "p" + hashlib.sha1(f"{keys[i]}\0{keys[j]}".encode()).hexdigest()[:19]
                items.append(
                    Item(key, "pair", recs[0]["caption"], pk, [keys[i], keys[j]], [refs[i], refs[j]])
                )
    return items, skipped


def load_source(
    path: str,
    mode: str = "auto",
    max_items: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    checks: int = 0,
    check_column: str = "label_0",
) -> Source:
    """Every usable item of the source, in serving order (seeded shuffle, then the first ``max_items``),
    ``checks`` of them (seeded) marked as check items with their known answer."""
    p = Path(path)
    if p.is_dir() and (p / SAMPLES_INDEX).is_file():
        kind = "samples"
        items, skipped = _sample_items(p, "best_of_k" if mode == "auto" else mode)
        files = [p / SAMPLES_INDEX]
    else:
        if mode == "best_of_k":
            raise UserError(
                f"source={path}: items.mode=best_of_k needs a sampling folder (with {SAMPLES_INDEX}); "
                "a Pick-a-Pic parquet holds pairs"
            )
        kind = "pickapic"
        items, skipped, files = _pickapic_items(path, check_column)
    if not items:
        raise UserError(f"source={path}: nothing to label (skipped: {dict(skipped)})")
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    if max_items:
        items = items[:max_items]
    if checks:
        eligible = [i for i, it in enumerate(items) if it.answer is not None]
        if len(eligible) < checks:
            raise UserError(
                f"checks.count={checks}: only {len(eligible)} items have a known answer in column "
                f"{check_column!r} of source={path}"
            )
        for i in np.random.default_rng(seed + 1).choice(eligible, size=checks, replace=False):
            items[int(i)].is_check = True
    for it in items:
        if not it.is_check:
            it.answer = None  # a known answer is only stored for checks
    return Source(str(path), kind, items, skipped, _fingerprint(files))


class ImageReader:
    """Image bytes by source reference. Parquet images are read a row group at a time (a parquet
    column chunk cannot be read one value at a time) and kept in a byte-bounded LRU cache, so the
    neighbours the next requests ask for are already in memory."""

    def __init__(self, cache_bytes: int = 256 << 20):
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, dict[int, bytes]] = OrderedDict()
        self._sizes: dict[tuple, int] = {}
        self._starts: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def read(self, ref: dict) -> bytes:
        if "file" in ref:
            return Path(ref["file"]).read_bytes()
        path, row, column = ref["parquet"], int(ref["row"]), ref["column"]
        starts = self._row_group_starts(path)
        group = int(np.searchsorted(starts, row, side="right") - 1)
        ck = (path, group, column)
        with self._lock:
            hit = self._cache.get(ck)
            if hit is not None:
                self._cache.move_to_end(ck)
                return hit[row]
        rows = range(int(starts[group]), int(starts[group + 1]))
        values = pickapic.read_rows([Path(path)], [(0, r) for r in rows], [column])
        chunk = {r: v[column] or b"" for r, v in zip(rows, values)}
        with self._lock:
            self._cache[ck] = chunk
            self._sizes[ck] = sum(len(b) for b in chunk.values())
            while len(self._cache) > 1 and sum(self._sizes.values()) > self.cache_bytes:
                old, _ = self._cache.popitem(last=False)
                self._sizes.pop(old)
        return chunk[row]

    def _row_group_starts(self, path: str) -> np.ndarray:
        starts = self._starts.get(path)
        if starts is None:
            md = pq.ParquetFile(path).metadata
            starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
            self._starts[path] = starts
        return starts


def media_type(data: bytes) -> str:
    """The image type from its first bytes (served with nosniff, so it must be right)."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"
