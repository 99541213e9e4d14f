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
follow the encode stage (``pipeline.data.jobs``, ``pipeline.data.shards``). ``manifest.json`` merges
plan and sidecars (``merge_trajectories``): counts (prompts read, groups, pairs, skipped by reason),
sampler settings (with the DDIM scheduler's config, so a trainer rebuilds the same scheduler), the
model's identity, shapes, and bytes per group and per pair (K (K - 1) / 2 pairs per group).

This module is the one reader of the format, never unpickling: ``read_manifest`` (format and version
checked), ``read_groups`` (every group as numpy, for tests and tools), ``iter_groups`` (each group's
json and JPEGs only, a malformed sample a counted ``BadGroup``: the feedback stage's reading),
``read_images`` (every decoded image and its prompt: the online loop's evaluation) and
``index_arrays`` + ``read_array`` (the arrays of any group read by byte offset: the trainer's random
access). ``write_label_index`` makes a complete folder a source of the labelling service
(``images.jsonl``, ``pipeline.label.sources``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import shards
from pipeline.data.manifest import merge_manifest
from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, npy_bytes, write_temporary
from pipeline.label.sources import write_samples_index

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
        out["images"] = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in out["jpegs"]])
    return out


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes (fixed settings: the same pixels give the same bytes)."""
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


def trajectory_contents(out_dir: Path, plan: dict, records: list[dict]) -> dict:
    """The trajectories' manifest keys (``pipeline.data.manifest.merge_manifest``'s ``contents``):
    counts, the skipped prompts, the uncond file and the sizes. Refuses records that do not add up or
    were sampled with another uncond."""
    uncond_sha = shards.sha256_file(out_dir / UNCOND)
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
    uncond_bytes = (out_dir / UNCOND).stat().st_size
    return {
        "counts": {
            "prompts_read": plan["scan"]["prompts_read"],
            "groups": groups,
            "images": groups * k,
            "pairs": pairs,
            "skipped": dict(sorted(skipped.items())),
        },
        "skipped_prompt_indices": plan["scan"]["skipped_indices"],
        "uncond": {"name": UNCOND, "bytes": uncond_bytes, "sha256": uncond_sha},
        "shard_bytes": shard_bytes,
        "total_bytes": shard_bytes + uncond_bytes,
        "bytes_per_group": shard_bytes / max(groups, 1),
        "bytes_per_pair": shard_bytes / max(pairs, 1),
    }


def merge_trajectories(out_dir: Path, verify: bool = False) -> dict | None:
    """Merge a trajectory folder's ``manifest.json`` (None while shards, or its uncond, are missing),
    then make the complete folder a labelling source (``write_label_index``)."""
    if not (Path(out_dir) / UNCOND).exists():
        return None
    manifest = merge_manifest(out_dir, verify, contents=trajectory_contents)
    if manifest is not None:  # complete: people can label it (python -m stages.label serve source=<out>)
        write_label_index(out_dir)
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """The trajectory folder's ``manifest.json``; a UserError unless it is this format and version."""
    return shards.load_manifest(folder, FORMAT, VERSION, unfinished="the sample jobs have not all finished")


# --- reading ----------------------------------------------------------------------------------------


def _shard_samples(folder: Path, manifest: dict, verify: bool) -> Iterator[tuple[str, dict]]:
    """(shard name, raw sample) of every sample of the folder in manifest order. A missing shard, a
    sha256 that is not the manifest's (with ``verify``) or an unreadable tar is a UserError: the whole
    shard is in doubt."""
    for s in manifest.get("shards", []):
        p = folder / s["name"]
        if not p.is_file():
            raise UserError(f"{p}: listed in the manifest but missing")
        if verify and s.get("sha256") and shards.sha256_file(p) != s["sha256"]:
            raise UserError(f"{p}: sha256 differs from the manifest's (damaged or replaced); sample it again")
        try:
            for raw in shards.iter_tar_samples(p):
                yield s["name"], raw
        except UserError:
            raise
        except Exception as e:  # tarfile.ReadError, EOFError, webdataset's ValueError on a broken member
            raise UserError(f"{p}: not a readable tar ({type(e).__name__}: {e}); sample it again") from e


def read_groups(shard_dir: str | Path, verify: bool = False, decode_images: bool = False) -> Iterator[dict]:
    """Every prompt group of a trajectory folder, in shard order (``decode_group``'s dicts). With
    ``verify`` each shard's sha256 is checked against the manifest first."""
    d = Path(shard_dir)
    for _, raw in _shard_samples(d, read_manifest(d), verify):
        yield decode_group(raw, decode_images)


@dataclass
class Group:
    """One prompt group as the feedback sees it: its json's fields and its JPEGs."""

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


def iter_groups(folder: str | Path, manifest: dict, verify: bool = True) -> Iterator[Group | BadGroup]:
    """Every sample of the folder in manifest order, as a ``Group`` (json and JPEGs, no arrays) or a
    ``BadGroup``; the shard-level errors of ``_shard_samples``."""
    for shard, raw in _shard_samples(Path(folder), manifest, verify):
        yield _group(raw, shard)


def decode_images(group: Group) -> list | None:
    """The group's images as RGB PIL images, or None when one does not decode (a corrupt JPEG)."""
    out = []
    for data in group.jpegs:
        try:
            with Image.open(io.BytesIO(data)) as im:
                out.append(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None
    return out


def read_images(folder: str | Path) -> tuple[list, list[str]]:
    """Every image of a complete trajectory folder (manifest order, group by group) and its prompt; a
    malformed group or an image that does not decode is a UserError."""
    images, prompts = [], []
    for g in iter_groups(folder, read_manifest(folder)):
        if isinstance(g, BadGroup):
            raise UserError(f"{folder}: group {g.key} is malformed ({g.reason}); sample it again")
        ims = decode_images(g)
        if ims is None:
            raise UserError(f"{folder}: an image of group {g.key} does not decode; sample it again")
        images += ims
        prompts += [g.prompt] * len(ims)
    return images, prompts


def index_arrays(shard_dir: Path, manifest: dict) -> dict[str, dict[str, tuple[Path, int, int]]]:
    """key -> array name -> (shard, byte offset, size) of the arrays of every group, from the tar
    headers alone (``read_array`` reads one when a batch needs it, never all at once)."""
    out: dict[str, dict[str, tuple[Path, int, int]]] = {}
    for s in manifest["shards"]:
        p = shard_dir / s["name"]
        if not p.is_file():
            raise UserError(f"{p}: listed in the manifest but missing")
        try:
            with tarfile.open(p, "r:") as tar:
                for ti in tar:
                    if not ti.isfile():
                        continue
                    key, _, suffix = Path(ti.name).name.partition(".")
                    name = suffix.removesuffix(".npy")
                    if suffix.endswith(".npy") and name in ARRAY_FIELDS:
                        out.setdefault(key, {})[name] = (p, ti.offset_data, ti.size)
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"{p}: not a readable tar ({type(e).__name__}: {e}); sample it again") from e
    for key, arrays in out.items():
        missing = [name for name in ARRAY_FIELDS if name not in arrays]
        if missing:
            raise UserError(f"{arrays[next(iter(arrays))][0]}: group {key} has no {missing[0]}.npy")
    return out


def read_array(where: tuple[Path, int, int]) -> np.ndarray:
    """One array of ``index_arrays``: (shard, byte offset, size)."""
    path, offset, size = where
    with open(path, "rb") as f:
        f.seek(offset)
        return np.load(io.BytesIO(f.read(size)), allow_pickle=False)


# --- the labelling service's index ----------------------------------------------------------------


def write_label_index(shard_dir: str | Path) -> Path:
    """Make a complete trajectory folder a source the labelling service reads: every image as
    ``images/<KEY>_<j>.jpg`` and ``images.jsonl`` (``image_key`` ``KEY/j``, the key the feedback stage
    matches people's labels by; ``prompt_key`` the group ``KEY``). The JPEG bytes are the shards' own;
    each file is written atomically, and a rerun rewrites the same bytes."""
    d = Path(shard_dir)
    (d / "images").mkdir(exist_ok=True)
    records = []
    for g in read_groups(d):
        for j, jpeg in enumerate(g["jpegs"]):
            rel = f"images/{g['key']}_{j}.jpg"
            atomic_write_bytes(d / rel, jpeg)
            records.append(
                {
                    "image_key": f"{g['key']}/{j}",
                    "prompt_key": g["key"],
                    "caption": g["meta"]["prompt"],
                    "k": j,
                    "file": rel,
                }
            )
    return write_samples_index(d, records)
