"""The shard format (v2): webdataset tar shards of preference pairs, per-shard text files, their
sidecar records and the manifest.

Per pair ``KEY`` (stable: a hash of ranking_id and the two image uids) a shard holds:

    KEY.lat_w.npy   float16 [C, R/f, R/f]  VAE latent mean of the preferred image, times the scaling factor
    KEY.lat_l.npy   float16 [C, R/f, R/f]  the same for the rejected image
    KEY.std_w.npy / KEY.std_l.npy          optional (output.store_std): latent std, for sampling
    KEY.json        caption, ranking_id, user_id, image uids, winner (index in the source row),
                    original sizes and crop offsets per image, extra columns, and ``text: [i, row]``:
                    where the caption's text embedding lies (``pipeline.data.text_store``)

Each caption's embedding is stored once, in ``text-NNNNNN.npy`` (float16 [n, 77, D]; SDXL also
``pooled-NNNNNN.npy``, float16 [n, P]) of the shard where the caption first occurs. Shard *i*'s text
files, then ``shard-NNNNNN.tar``, are written under temporary names and renamed when complete; its
sidecar ``shard-NNNNNN.json`` (count, sha256 of the tar and of its text files, skipped rows) is
written the same way last, so a shard with a sidecar whose hashes match is finished.
``manifest.json`` merges the sidecars. Tar members carry fixed metadata (mtime 0, fixed owner), so
the same pairs give the same bytes. Format v1 (the embedding in every pair) is refused: re-encode.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, npy_bytes, write_json_atomic

FORMAT = "pickapic-dpo-shards"
VERSION = 2
ARRAY_FIELDS = ("lat_w", "lat_l", "txt", "pooled", "std_w", "std_l")


def pair_key(ranking_id: int, uid_0: str, uid_1: str) -> str:
    """Stable sample key of a pair: the same Pick-a-Pic row always gives the same key."""
    return hashlib.sha1(f"{ranking_id}:{uid_0}:{uid_1}".encode()).hexdigest()[:20]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sidecar_path(tar_path: Path) -> Path:
    return tar_path.with_suffix(".json")


def encode_sample(key: str, arrays: dict[str, np.ndarray], meta: dict) -> dict[str, bytes]:
    members = {f"{name}.npy": npy_bytes(a) for name, a in arrays.items() if a is not None}
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    return {"__key__": key, **members}


def decode_sample(raw: dict, texts=None) -> dict:
    """webdataset raw sample (bytes per member) -> numpy arrays + meta; never unpickles. With
    ``texts`` (a ``TextStore``) the caption's ``txt`` (and SDXL's ``pooled``) are looked up."""
    out = {"__key__": raw["__key__"]}
    for name in ARRAY_FIELDS:
        data = raw.get(f"{name}.npy")
        if data is not None:
            out[name] = np.load(io.BytesIO(data), allow_pickle=False)
    if "json" not in raw:
        raise ValueError(f"sample {raw['__key__']}: no json member")
    out["meta"] = json.loads(raw["json"])
    if texts is not None and "txt" not in out:
        ref = out["meta"].get("text") if isinstance(out["meta"], dict) else None
        if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(x, int) for x in ref)):
            raise ValueError(f"sample {raw['__key__']}: no text reference [shard, row] in its json")
        out["txt"], pooled = texts.lookup(ref)
        if pooled is not None:
            out["pooled"] = pooled
    return out


def label_agrees_with_truth(meta: dict) -> float:
    """1.0 if the pair's recorded label (``winner``) agrees with the source's true preference
    (``extra.true_label_0``, the toy worlds' ground truth), 0.0 if not, NaN where none was recorded."""
    t = meta.get("extra", {}).get("true_label_0")
    return float("nan") if t is None else float((meta["winner"] == 0) == (t == 1.0))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(tar_path: Path, samples: list[dict[str, bytes]], record: dict) -> dict:
    """Write the tar (tmp + rename), then its sidecar record with count, bytes and sha256 (the text
    files, written before, are in ``record["text_files"]``)."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, user="pickapic", group="pickapic", mtime=0, encoder=False) as sink:
        for s in samples:
            sink.write(s)
    data = buf.getvalue()
    atomic_write_bytes(tar_path, data)
    record = dict(
        record,
        name=tar_path.name,
        count=len(samples),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    write_json_atomic(sidecar_path(tar_path), record)
    return record


def finished_record(tar_path: Path, verify: bool = True) -> dict | None:
    """The sidecar record if the shard is complete (and, with ``verify``, its sha256 matches)."""
    side = sidecar_path(tar_path)
    if not (tar_path.is_file() and side.is_file()):
        return None
    try:
        record = json.loads(side.read_text())
    except json.JSONDecodeError:
        return None
    if verify and sha256_file(tar_path) != record.get("sha256"):
        return None
    for t in record.get("text_files", []):
        p = tar_path.parent / t["name"]
        if not p.is_file() or (verify and sha256_file(p) != t["sha256"]):
            return None
    return record


def remove_stale_tmp(out_dir: Path, names: list[str]) -> int:
    """Delete temporaries left by a killed writer of these shards; returns how many."""
    n = 0
    for name in names:
        stem = Path(name).stem
        for p in out_dir.glob(f".{stem}.*.tmp-*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def iter_tar_samples(path: Path):
    """Yield raw samples (member suffix -> bytes, ``__key__``) of one tar in file order, using
    webdataset's own tar expansion and key grouping. Raises on a truncated or corrupt tar."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(path, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"stream": stream, "url": str(path)}]))


def load_manifest(
    shard_dir: str | Path,
    fmt: str = FORMAT,
    version: int = VERSION,
    unfinished: str = "the encode array has not finished, or run tools.merge_manifest",
) -> dict:
    """A shard folder's ``manifest.json``, refused unless it is ``fmt`` v``version`` (the encoded pairs'
    by default; ``pipeline.d3po.trajectories.read_manifest`` asks for trajectories). Without one, the
    error counts the shard records present and says why they are not merged yet (``unfinished``)."""
    p = Path(shard_dir) / "manifest.json"
    if not p.is_file():
        parts = sorted(Path(shard_dir).glob("shard-*.json")) if Path(shard_dir).is_dir() else []
        hint = f" ({len(parts)} shard records present: {unfinished})" if parts else ""
        raise UserError(f"{p}: no manifest{hint}")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e})") from e
    if fmt == FORMAT and m.get("format") == FORMAT and m.get("version") == 1:
        raise UserError(
            f"{p}: shards in format v1 (a text embedding stored with every pair); this version reads v2, "
            "which stores each caption's embedding once: re-encode them (python -m stages.encode, same "
            "config, a new output.dir)"
        )
    if m.get("format") != fmt or m.get("version") != version:
        raise UserError(
            f"{p}: not a {fmt} v{version} manifest (format={m.get('format')!r}, version={m.get('version')!r})"
        )
    return m


def tar_member_names(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()
