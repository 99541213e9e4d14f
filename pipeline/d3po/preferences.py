"""D3PO preference files: which of two sampled images of one prompt is preferred, by scripted rewards or
by people, for every pair of every prompt group of a trajectory folder.

Written by ``stages.feedback`` into its output folder, read by the D3PO trainer (``load_preferences``):

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

**People's labels** come from the labelling service's export, ``image_preferences.jsonl``
(``pipeline.label.export``: one line per judged image, ``{"prompt_key", "image_key", "user_id",
"annotator", "score", "created_at"}``, score in [0, 1]). As its contract says, the scores of an image
are averaged (over annotators and items) and every pair of a group whose means differ trains; equal
means are ties; a pair with an image nobody judged is left out (counted as ``unlabelled_pairs``) and a
group with no judged pair is skipped as ``unlabelled``. Images are matched by ``image_key`` (``KEY/j``,
as the sample stage lists them); ``prompt_key`` is not used. A label of an image that is not in the
trajectory folder is an error naming it (``unknown_images=error``, the default: the labels were likely
made on another sample run), or dropped and counted (``unknown_images=skip``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.d3po.rewards import maybe_flip, pareto
from pipeline.data.shards import _atomic_write_bytes, iter_tar_samples, sha256_file, write_json_atomic
from pipeline.errors import UserError

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


# --- reading the trajectory folder (only what feedback needs: the json and the JPEGs) ---------------


@dataclass
class Group:
    """One prompt group of a trajectory folder, as far as feedback is concerned."""

    key: str
    prompt: str
    prompt_index: int
    image_keys: list[str]
    jpegs: list[bytes]
    shard: str


@dataclass
class BadGroup:
    """A sample that cannot be a group (no json, unreadable json, fewer than 2 images): skipped, counted."""

    key: str
    reason: str
    shard: str


def _group(raw: dict, shard: str) -> Group | BadGroup:
    key = raw["__key__"]
    try:
        meta = json.loads(raw["json"])
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (KeyError, ValueError, UnicodeDecodeError):
        return BadGroup(key, "malformed_group", shard)
    jpegs = []
    while f"img{len(jpegs)}.jpg" in raw:
        jpegs.append(raw[f"img{len(jpegs)}.jpg"])
    k = len(jpegs)
    # the sample stage lists the image keys in its json (``images``; ``image_keys`` in an early draft)
    listed = meta.get("images", meta.get("image_keys"))
    if isinstance(listed, list) and all(isinstance(s, str) for s in listed):
        image_keys = list(listed)
    else:
        image_keys = [f"{key}/{j}" for j in range(k)]
    if k < 2 or len(image_keys) != k:
        return BadGroup(key, "malformed_group", shard)
    prompt_index = meta.get("prompt_index", -1)
    return Group(
        key=key,
        prompt=str(meta.get("prompt", "")),
        prompt_index=prompt_index if isinstance(prompt_index, int) else -1,
        image_keys=image_keys,
        jpegs=jpegs,
        shard=shard,
    )


def read_manifest(folder: str | Path) -> dict:
    """The trajectory folder's manifest (``pipeline.d3po.trajectories``' check of format and version)."""
    from pipeline.d3po.trajectories import load_manifest

    return load_manifest(folder)


def iter_groups(folder: str | Path, manifest: dict, verify: bool = True) -> Iterator[Group | BadGroup]:
    """Every sample of the folder in manifest order. A missing shard, a sha256 that is not the
    manifest's (with ``verify``) or an unreadable tar is a UserError: the whole shard is in doubt."""
    d = Path(folder)
    for s in manifest.get("shards", []):
        p = d / s["name"]
        if not p.is_file():
            raise UserError(f"{p}: listed in the manifest but missing")
        if verify and s.get("sha256") and sha256_file(p) != s["sha256"]:
            raise UserError(f"{p}: sha256 differs from the manifest's (damaged or replaced); sample it again")
        try:
            for raw in iter_tar_samples(p):
                yield _group(raw, s["name"])
        except UserError:
            raise
        except Exception as e:  # tarfile.ReadError, EOFError, webdataset's ValueError on a broken member
            raise UserError(f"{p}: not a readable tar ({type(e).__name__}: {e}); sample it again") from e


def decode_images(group: Group) -> list | None:
    """The group's images as RGB PIL images, or None when one does not decode (a corrupt JPEG)."""
    from PIL import Image

    out = []
    for data in group.jpegs:
        try:
            with Image.open(io.BytesIO(data)) as im:
                out.append(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None
    return out


# --- people's labels ---------------------------------------------------------------------------


@dataclass
class HumanScores:
    """Per image key: the sum and count of its scores (exact, so equal means compare equal)."""

    path: Path
    sums: dict[str, Fraction] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    first_line: dict[str, int] = field(default_factory=dict)
    lines: int = 0

    def mean(self, image_key: str) -> Fraction | None:
        n = self.counts.get(image_key, 0)
        return self.sums[image_key] / n if n else None


def human_file(path: str | Path) -> Path:
    """``image_preferences.jsonl`` itself, or the export folder holding it."""
    from pipeline.label.export import PREFERENCES

    p = Path(path)
    if p.is_dir():
        p = p / PREFERENCES
    if not p.is_file():
        raise UserError(f"human={path}: no such file (give image_preferences.jsonl or the export folder)")
    return p


def read_human(path: str | Path) -> HumanScores:
    """Read the labelling export's per-image preference file; a malformed line is a UserError naming it."""
    p = human_file(path)
    out = HumanScores(p)
    with open(p, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{no}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise UserError(f"{p}:{no}: expected a JSON object")
            key, score = rec.get("image_key"), rec.get("score")
            if not isinstance(key, str) or not key:
                raise UserError(f"{p}:{no}: image_key: expected a non-empty string, got {key!r}")
            if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
                raise UserError(f"{p}:{no}: score: expected a number in [0, 1], got {score!r}")
            out.sums[key] = out.sums.get(key, Fraction(0)) + Fraction(score)
            out.counts[key] = out.counts.get(key, 0) + 1
            out.first_line.setdefault(key, no)
            out.lines += 1
    return out


def check_unknown(
    scores: HumanScores,
    known: set[str],
    policy: str,
    folder: str | Path,
    skipped_groups: set[str] = frozenset(),
) -> int:
    """Labels of images the trajectory folder does not have: an error naming the first (``error``), or
    their count (``skip``; they are then ignored, since matching is by image key). Labels of a group the
    run skipped (``KEY/j`` of a malformed sample) are not unknown: that group is counted already."""
    unknown = sorted(
        (k for k in scores.counts if k not in known and k.split("/")[0] not in skipped_groups),
        key=lambda k: scores.first_line[k],
    )
    if unknown and policy == "error":
        k = unknown[0]
        raise UserError(
            f"{scores.path}:{scores.first_line[k]}: image_key {k!r} is not an image of the trajectory folder "
            f"{folder} ({len(unknown)} unknown image key(s)); were these labels made on another sample run? "
            "(unknown_images=skip drops and counts them)"
        )
    return len(unknown)


# --- pairs --------------------------------------------------------------------------------------


def _cmp_fraction(a: Fraction, b: Fraction) -> int:
    return (a > b) - (a < b)


def group_rows(
    group: Group,
    values: np.ndarray,
    source: str,
    flip: tuple[float, int, str] = (0.0, 0, "pair"),
    votes: Sequence[int] | None = None,
    order: Sequence[Fraction] | None = None,
) -> list[dict]:
    """One row per pair ``i < j`` of a group. ``values`` [K, R] are compared by Pareto dominance, or
    ``order`` (exact human means) when given; pairs with an image of 0 ``votes`` are left out (human
    mode). ``flip`` = (rate, seed, by): decided pairs whose hash falls under the rate are reversed."""
    k = len(group.image_keys)
    values = np.asarray(values, dtype=np.float64).reshape(k, -1)
    rate, seed, by = flip
    rows = []
    for i in range(k):
        for j in range(i + 1, k):
            if votes is not None and (votes[i] == 0 or votes[j] == 0):
                continue
            c = _cmp_fraction(order[i], order[j]) if order is not None else pareto(values[i], values[j])
            winner = i if c > 0 else (j if c < 0 else -1)
            winner, flipped = maybe_flip(winner, i, j, group.key, rate, seed, by)
            rows.append(
                {
                    "key": group.key,
                    "prompt": group.prompt,
                    "prompt_index": group.prompt_index,
                    "i": i,
                    "j": j,
                    "image_i": group.image_keys[i],
                    "image_j": group.image_keys[j],
                    "winner": winner,
                    "flipped": flipped,
                    "values_i": values[i].tolist(),
                    "values_j": values[j].tolist(),
                    "votes_i": int(votes[i]) if votes is not None else 0,
                    "votes_j": int(votes[j]) if votes is not None else 0,
                    "source": source,
                }
            )
    return rows


def human_group(group: Group, scores: HumanScores) -> tuple[np.ndarray, list[int], list[Fraction]]:
    """(mean score [K, 1] as float, votes per image, exact means) of one group's images."""
    votes = [scores.counts.get(k, 0) for k in group.image_keys]
    exact = [scores.mean(k) if n else Fraction(0) for k, n in zip(group.image_keys, votes)]
    means = np.array([[float(m) if n else math.nan] for m, n in zip(exact, votes)], dtype=np.float64)
    return means, votes, exact


# --- the files ----------------------------------------------------------------------------------


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
    _atomic_write_bytes(out / PARQUET, data)
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
