"""D3PO trajectory shards (format ``d3po-trajectories`` v1): what ``stages.sample`` writes and what the
D3PO trainer and the feedback stage read.

One webdataset sample per *prompt group*: the K images sampled for one prompt, all from the same
initial noise x_T (as D3PO samples), each with its whole DDIM trajectory. With N sampler steps, K
images, latents [C, h, w] and text width D, the sample ``KEY`` (a hash of the prompt's index and
text, stable across runs) holds:

    KEY.latents.npy    float16 [K, N+1, C, h, w]  x_T ... x_0 of each image; [:, 0] is the same x_T
    KEY.log_probs.npy  float32 [K, N]             log p(x_{t-1} | x_t) of each transition as sampled
                                                  (``pipeline.d3po.ddim.ddim_step_with_logprob``)
    KEY.timesteps.npy  int64 [N]                  the timestep t of transition n (x_t = latents[:, n])
    KEY.txt.npy        float16 [77, D]            the prompt's text embedding, as the UNet saw it
    KEY.img0.jpg ...   JPEG                       x_0 of image j decoded by the VAE (RGB, 8 bit)
    KEY.img{K-1}.jpg
    KEY.json           prompt, prompt_index, seed (of the group's generator), shard, images
                       (``KEY/j``: the id a preference label names), sampler settings

Latents are stepped in float16, not only stored so: each x_{t-1} is rounded to float16 before it is
scored and before the next step reads it, and the text embeddings are rounded the same way before the
UNet sees them, so the stored arrays are exactly what the sampler computed with. Re-scoring a stored
transition with the sampling UNet (same dtype, device and batch layout) reproduces the stored log-prob
bit for bit, which makes the policy/reference ratio exactly 1 at the start of training.

The unconditional embedding (the empty prompt's, float16 [1, 77, D]) is stored once per folder as
``uncond.npy``; each shard's record names the sha256 of the one it was sampled with, and the manifest
lists it. Writing (tmp + rename, then a sidecar ``shard-NNNNNN.json`` with count and sha256),
skipping finished shards and the ``plan.json`` that every job of a job array computes identically
follow the encode stage (``pipeline.data.shards``). ``manifest.json`` merges plan and sidecars:
counts (prompts read, groups, pairs, skipped by reason), sampler settings (with the DDIM scheduler's
config, so a trainer rebuilds the same scheduler), the model's identity, shapes, and bytes per group
and per pair (K (K - 1) / 2 pairs per group). ``read_groups`` reads it all back as numpy, never
unpickling.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.data.shards import (
    finished_record,
    iter_tar_samples,
    sha256_file,
    shard_name,
    write_json_atomic,
    write_temporary,
)
from pipeline.errors import UserError

FORMAT = "d3po-trajectories"
VERSION = 1
UNCOND = "uncond.npy"
ARRAY_FIELDS = {"latents": np.float16, "log_probs": np.float32, "timesteps": np.int64, "txt": np.float16}


def group_key(prompt_index: int, prompt: str) -> str:
    """Stable sample key of a prompt group: the same prompt at the same index always gets the same key."""
    return hashlib.sha1(f"{prompt_index}:{prompt}".encode()).hexdigest()[:20]


def group_seed(seed: int, prompt_index: int) -> int:
    """Seed of prompt ``prompt_index``'s generator: a hash of (sampler.seed, index), so neighbouring
    prompts or seeds do not get overlapping torch streams, and no job layout changes any prompt's noise."""
    digest = hashlib.sha256(f"d3po-sample:{seed}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def pairs_per_group(k: int) -> int:
    return k * (k - 1) // 2


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_group(key: str, arrays: dict[str, np.ndarray], jpegs: list[bytes], meta: dict) -> dict[str, bytes]:
    """One webdataset sample (member suffix -> bytes); refuses an array of the wrong dtype, since the
    reader and the trainer take the dtypes of the format as given."""
    out: dict[str, bytes] = {"__key__": key}  # type: ignore[dict-item]
    for name, dtype in ARRAY_FIELDS.items():
        a = arrays[name]
        if a.dtype != dtype:
            raise TypeError(f"{name}: expected {np.dtype(dtype)}, got {a.dtype}")
        out[f"{name}.npy"] = npy_bytes(a)
    for j, data in enumerate(jpegs):
        out[f"img{j}.jpg"] = data
    out["json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def decode_group(raw: dict, decode_images: bool = False) -> dict:
    """A raw sample -> ``{"key", "latents", "log_probs", "timesteps", "txt", "meta", "jpegs"}`` (and
    ``"images"``, uint8 [K, H, W, 3], with ``decode_images``). Never unpickles."""
    if "json" not in raw:
        raise ValueError(f"sample {raw['__key__']}: no json member")
    out = {"key": raw["__key__"], "meta": json.loads(raw["json"])}
    for name in ARRAY_FIELDS:
        data = raw.get(f"{name}.npy")
        if data is None:
            raise ValueError(f"sample {raw['__key__']}: no {name}.npy member")
        out[name] = np.load(io.BytesIO(data), allow_pickle=False)
    k = out["latents"].shape[0]
    missing = [j for j in range(k) if f"img{j}.jpg" not in raw]
    if missing:
        raise ValueError(f"sample {raw['__key__']}: no img{missing[0]}.jpg member")
    out["jpegs"] = [raw[f"img{j}.jpg"] for j in range(k)]
    if decode_images:
        from PIL import Image

        out["images"] = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in out["jpegs"]])
    return out


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes (fixed settings: the same pixels give the same bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_once(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` unless it exists: written to a temporary name, then hard-linked
    into place, which fails if another job got there first. Every job then reads the one file, so all
    shards of a folder are sampled with the same bytes even if jobs computed them on other hardware."""
    if path.exists():
        return
    tmp = write_temporary(path, data)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a rename (the last writer wins)
            if not path.exists():
                tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_uncond(shard_dir: str | Path, text_dim: int | None = None) -> np.ndarray:
    """The folder's unconditional embedding, float16 [1, 77, D]."""
    p = Path(shard_dir) / UNCOND
    if not p.is_file():
        raise UserError(f"{p}: missing (every trajectory folder has its unconditional embedding)")
    a = np.load(p, allow_pickle=False)
    if (
        a.dtype != np.float16
        or a.ndim != 3
        or a.shape[:2] != (1, 77)
        or (text_dim and a.shape[2] != text_dim)
    ):
        raise UserError(f"{p}: expected float16 [1, 77, {text_dim or 'D'}], got {a.dtype} {list(a.shape)}")
    return a


def merge_manifest(out_dir: Path, verify: bool = False) -> dict | None:
    """Write ``manifest.json`` from ``plan.json``, the shard sidecars and ``uncond.npy``; None while
    shards are missing. Refuses records that do not add up or were sampled with another uncond."""
    out_dir = Path(out_dir)
    plan = json.loads((out_dir / "plan.json").read_text())
    records = []
    for i in range(plan["n_shards"]):
        rec = finished_record(out_dir / shard_name(i), verify=verify)
        if rec is None:
            return None
        records.append(rec)
    uncond_sha = sha256_file(out_dir / UNCOND)
    for rec in records:
        start, end = rec["groups"]
        if rec["count"] != end - start:
            raise UserError(
                f"{out_dir / rec['name']}: its record says {rec['count']} groups, but the shard covers "
                f"{end - start} prompts; delete the shard and its .json and run the sample stage again"
            )
        if rec.get("uncond_sha256") != uncond_sha:
            raise UserError(
                f"{out_dir / rec['name']}: sampled with another {UNCOND} than the folder's; delete the "
                "shard and its .json and run the sample stage again"
            )
    groups = sum(r["count"] for r in records)
    skipped = Counter(plan["scan"]["skipped"])
    if groups + sum(skipped.values()) != plan["scan"]["prompts_read"]:
        raise UserError(
            f"{out_dir}: the shard records do not add up: {groups} groups + {sum(skipped.values())} skipped "
            f"prompts != {plan['scan']['prompts_read']} prompts read; delete the shards whose counts are "
            "wrong and run the sample stage again"
        )
    k = plan["sampler"]["images_per_prompt"]
    shard_bytes = sum(r["bytes"] for r in records)
    pairs = groups * pairs_per_group(k)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **{key: v for key, v in plan.items() if key not in ("scan", "format", "version")},
        "counts": {
            "prompts_read": plan["scan"]["prompts_read"],
            "groups": groups,
            "images": groups * k,
            "pairs": pairs,
            "skipped": dict(sorted(skipped.items())),
        },
        "skipped_prompt_indices": plan["scan"]["skipped_indices"],
        "uncond": {"name": UNCOND, "bytes": (out_dir / UNCOND).stat().st_size, "sha256": uncond_sha},
        "shards": [{key: r[key] for key in ("name", "count", "bytes", "sha256")} for r in records],
        "shard_bytes": shard_bytes,
        "total_bytes": shard_bytes + (out_dir / UNCOND).stat().st_size,
        "bytes_per_group": shard_bytes / max(groups, 1),
        "bytes_per_pair": shard_bytes / max(pairs, 1),
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def load_manifest(shard_dir: str | Path) -> dict:
    p = Path(shard_dir) / "manifest.json"
    if not p.is_file():
        parts = sorted(Path(shard_dir).glob("shard-*.json")) if Path(shard_dir).is_dir() else []
        hint = (
            f" ({len(parts)} shard records present: the sample jobs have not all finished)" if parts else ""
        )
        raise UserError(f"{p}: no manifest{hint}")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e})") from e
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise UserError(
            f"{p}: not a {FORMAT} v{VERSION} manifest (format={m.get('format')!r}, version={m.get('version')!r})"
        )
    return m


def read_groups(shard_dir: str | Path, verify: bool = False, decode_images: bool = False) -> Iterator[dict]:
    """Every prompt group of a trajectory folder, in shard order (``decode_group``'s dicts). With
    ``verify`` each shard's sha256 is checked against the manifest first."""
    d = Path(shard_dir)
    m = load_manifest(d)
    for s in m["shards"]:
        p = d / s["name"]
        if not p.is_file():
            raise UserError(f"{p}: listed in the manifest but missing")
        if verify and sha256_file(p) != s["sha256"]:
            raise UserError(f"{p}: sha256 differs from the manifest's (damaged or replaced)")
        for raw in iter_tar_samples(p):
            yield decode_group(raw, decode_images)


LABEL_INDEX = "images.jsonl"  # the labelling service's sampling-folder source (pipeline/label/sources.py)


def write_label_index(shard_dir: str | Path) -> Path:
    """Make a complete trajectory folder a source the labelling service reads: every image as
    ``images/<KEY>_<j>.jpg`` and ``images.jsonl`` (``image_key`` ``KEY/j``, the key the feedback stage
    matches people's labels by; ``prompt_key`` the group ``KEY``). The JPEG bytes are the shards' own;
    each file is written atomically, and a rerun rewrites the same bytes."""
    from pipeline.data.shards import _atomic_write_bytes

    d = Path(shard_dir)
    (d / "images").mkdir(exist_ok=True)
    lines = []
    for g in read_groups(d):
        for j, jpeg in enumerate(g["jpegs"]):
            rel = f"images/{g['key']}_{j}.jpg"
            _atomic_write_bytes(d / rel, jpeg)
            rec = {"image_key": f"{g['key']}/{j}", "prompt_key": g["key"], "caption": g["meta"]["prompt"], "k": j,
                   "file": rel}  # fmt: skip
            lines.append(json.dumps(rec, sort_keys=True))
    _atomic_write_bytes(d / LABEL_INDEX, ("\n".join(lines) + "\n").encode())
    return d / LABEL_INDEX
