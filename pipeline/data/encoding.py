"""The encode stage's job: Pick-a-Pic pairs -> webdataset shards of VAE latents and text embeddings
(``pipeline.data.shards``) + a manifest.

``encode_pairs`` is one job of a job array (``pipeline.data.jobs``): it scans the source (the kept
rows, in source order, are a pure function of the input), plans the shards, and encodes this job's
unfinished ones: each shard's new captions once (``pipeline.data.text_store``), then its pairs'
images through the VAE in batches; bad rows are skipped and counted, never a traceback.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import to_dict
from pipeline.data import pickapic
from pipeline.data.images import ImageDecodeError, prepare
from pipeline.data.jobs import ShardJob, job_of, open_job
from pipeline.data.manifest import merge_manifest, shard_ranges
from pipeline.data.shards import FORMAT, VERSION, encode_sample, pair_key, shard_name
from pipeline.data.text_store import plan_texts, pooled_name, text_name, write_texts
from pipeline.encoders import Encoder
from pipeline.errors import UserError
from pipeline.models import DTYPES, ModelInfo, inspect_model, pick_device
from pipeline.schema.encode import EncodeConfig

log = logging.getLogger(__name__)
ROW_COLUMNS = [*pickapic.REQUIRED_COLUMNS, *pickapic.OPTIONAL_COLUMNS]
NONFINITE = "nonfinite_latent"  # skip reason: the VAE gave NaN / inf for one or both images of a pair


def make_plan(cfg: EncodeConfig, info: ModelInfo, scan: pickapic.ScanResult) -> dict:
    latent = cfg.data.resolution // info.vae_scale_factor
    enc_cfg = to_dict(cfg)
    enc_cfg.pop("dist")
    enc_cfg.pop("run")  # batch sizes (pairs, VAE images) and threads do not change the output
    enc_cfg["output"].pop("dir")  # the manifest lives there; keeps manifests comparable across copies
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": info.as_dict(),
        "resolution": cfg.data.resolution,
        "latent_shape": [info.latent_channels, latent, latent],
        "text_shape": [77, info.text_dim],
        "pooled_dim": info.pooled_dim,
        "dtypes": {"latents": cfg.output.latent_dtype, "text": "fp16"},
        "text_store": "per caption, in the shard where it first occurs (text-NNNNNN.npy)",
        "store_std": cfg.output.store_std,
        "scaling_factor": info.scaling_factor,
        "encode_config": enc_cfg,
        "source": {"files": [str(f.resolve()) for f in scan.files], "rows_per_file": scan.rows_per_file},
        "shard_size": cfg.output.shard_size,
        "n_shards": len(shard_ranges(len(scan.kept), cfg.output.shard_size)),
        "scan": {
            "rows_read": scan.rows_read,
            "kept": len(scan.kept),
            "skipped": dict(scan.skipped),
            "skipped_ids": scan.skipped_ids,
        },
    }


def encode_texts(
    captions: list[str], encoder: Encoder, bs: int, info: ModelInfo
) -> tuple[np.ndarray, np.ndarray | None]:
    """Text embeddings (float16) of ``captions``, in batches; empty arrays for no captions."""
    txts, pooleds = (
        [np.zeros((0, 77, info.text_dim), np.float16)],
        [np.zeros((0, info.pooled_dim or 0), np.float16)],
    )
    for b in range(0, len(captions), bs):
        txt, pooled = encoder.encode_text(captions[b : b + bs])
        txts.append(txt.cpu().numpy().astype(np.float16))
        if pooled is not None:
            pooleds.append(pooled.cpu().numpy().astype(np.float16))
    return np.concatenate(txts), (np.concatenate(pooleds) if info.pooled_dim else None)


def encode_shard(
    index: int,
    rows: list[dict],
    text_refs: list[tuple[int, int]],
    encoder: Encoder,
    cfg: EncodeConfig,
    pool: ThreadPoolExecutor,
    pbar: tqdm,
) -> tuple[list[dict], Counter, dict[str, list[int]]]:
    """Decode, preprocess and VAE-encode the rows of one shard; bad rows are skipped and counted.
    Each pair's json points at its caption's text embedding (``text_refs``)."""
    res = cfg.data.resolution
    skipped, skipped_ids = Counter(), {}

    def prep(row):
        try:
            w = pickapic.winner_index(row)
            return w, prepare(row[f"jpg_{w}"], res), prepare(row[f"jpg_{1 - w}"], res)
        except ImageDecodeError as e:
            return e

    prepared = list(pool.map(prep, rows))
    good = []
    for row, ref, p in zip(rows, text_refs, prepared):
        if isinstance(p, ImageDecodeError):
            skipped[p.reason] += 1
            skipped_ids.setdefault(p.reason, []).append(int(row["ranking_id"]))
            log.warning("shard %d: skipping ranking_id %s: %s", index, row["ranking_id"], p)
            pbar.update(1)
        else:
            good.append((row, ref, p))
    lat_dtype = {"fp16": np.float16, "fp32": np.float32}[cfg.output.latent_dtype]
    samples = []
    bs = cfg.run.batch_size
    for b in range(0, len(good), bs):
        chunk = good[b : b + bs]
        n = len(chunk)
        pix = torch.from_numpy(
            np.stack([p[1].pixels for _, _, p in chunk] + [p[2].pixels for _, _, p in chunk])
        )
        mean, std = encoder.encode_images(pix, with_std=cfg.output.store_std, vae_batch=cfg.run.vae_batch)
        # one device -> host copy per batch; the check reads the values as stored (an fp32 latent
        # beyond fp16's range would be stored as inf)
        with np.errstate(over="ignore"):
            lat = mean.cpu().numpy().astype(lat_dtype)
            lat_std = None if std is None else std.cpu().numpy().astype(lat_dtype)
        finite = np.isfinite(lat.reshape(2 * n, -1)).all(axis=1)
        if lat_std is not None:
            finite &= np.isfinite(lat_std.reshape(2 * n, -1)).all(axis=1)
        for i, (row, ref, (w, pw, pl)) in enumerate(chunk):
            if not (finite[i] and finite[n + i]):
                bad = " and ".join(name for name, j in (("winner", i), ("loser", n + i)) if not finite[j])
                skipped[NONFINITE] += 1
                skipped_ids.setdefault(NONFINITE, []).append(int(row["ranking_id"]))
                log.warning(
                    "shard %d: skipping ranking_id %s: the VAE gave non-finite latents for the %s image",
                    index,
                    row["ranking_id"],
                    bad,
                )
                continue
            meta = {
                "caption": row["caption"],
                "text": list(ref),  # [shard, row] of the caption's embedding in the text files
                "ranking_id": int(row["ranking_id"]),
                "user_id": int(row["user_id"]),
                "image_uids": [row["image_0_uid"], row["image_1_uid"]],
                "winner": w,  # index of the preferred image in the source row
                "original_size_w": list(pw.original_size),
                "original_size_l": list(pl.original_size),
                "crop_top_left_w": list(pw.crop_top_left),
                "crop_top_left_l": list(pl.crop_top_left),
                "models": [row.get("model_0"), row.get("model_1")],
                "extra": {c: row.get(c) for c in [*cfg.data.extra_columns, *cfg.data.optional_columns]},
            }
            arrays = {
                "lat_w": lat[i],
                "lat_l": lat[n + i],
                "std_w": None if lat_std is None else lat_std[i],
                "std_l": None if lat_std is None else lat_std[n + i],
            }
            key = pair_key(row["ranking_id"], row["image_0_uid"], row["image_1_uid"])
            samples.append(encode_sample(key, arrays, meta))
        pbar.update(n)
    return samples, skipped, skipped_ids


def summary(shards: ShardJob, info: ModelInfo, captions: int, skipped: Counter, manifest: dict | None) -> str:
    """The job's report: the model, what it wrote (``captions`` distinct ones encoded), its bad rows
    (``skipped``), the manifest."""
    after = []
    if shards.written:
        pairs, dt = shards.items, shards.work_seconds
        after.append(
            f"  this job   {pairs} pairs, {pairs / max(dt, 1e-9):.2f} pairs/s, {shards.bytes / max(pairs, 1) / 1024:.1f} KiB/pair, "
            f"{captions} distinct captions encoded"
        )
    if skipped:
        after.append(f"  bad rows   {dict(skipped)}")
    manifest_lines = None
    if manifest is not None:
        c = manifest["counts"]
        manifest_lines = [
            f"  manifest   {shards.out / 'manifest.json'}: {len(manifest['shards'])} shards, {c['pairs']} pairs of {c['rows_read']} rows",
            f"  skipped    {c['skipped']}",
            f"  size       {manifest['total_bytes'] / 2**20:.2f} MiB, {manifest['total_bytes'] / max(c['pairs'], 1) / 1024:.1f} KiB/pair",
        ]
    return shards.summary([f"  model      {info.family.name}  {info.path}"], after, manifest_lines)


def encode_pairs(cfg: EncodeConfig) -> str:
    """Run one encode job; returns its summary (what it wrote, the manifest once the array is done)."""
    job = job_of(cfg.dist)
    info = inspect_model(cfg.model.path)
    files = pickapic.list_sources(cfg.data.source)
    pickapic.check_columns(files, cfg.data.extra_columns)
    if cfg.data.resolution % info.vae_scale_factor:
        raise UserError(
            f"data.resolution={cfg.data.resolution} is not a multiple of the VAE factor {info.vae_scale_factor}"
        )
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    scan = pickapic.scan(files)
    if not scan.kept:
        raise UserError(
            f"data.source={cfg.data.source}: no usable pairs in {scan.rows_read} rows (skipped: {dict(scan.skipped)})"
        )
    shards = open_job(
        "encode",
        cfg,
        job,
        make_plan(cfg, info, scan),
        len(scan.kept),
        what="shards of another encode run",
        files=lambda i: [shard_name(i), text_name(i), pooled_name(i)],
        started=t0,
    )
    texts = plan_texts(scan.kept_captions, shards.ranges)
    captions_done, skipped = 0, Counter()
    if shards.todo:
        encoder = Encoder(
            info,
            pick_device(cfg.model.device, job.local_rank),
            DTYPES[cfg.model.vae_dtype],
            DTYPES[cfg.model.text_dtype],
        )
        columns = ROW_COLUMNS + cfg.data.extra_columns + cfg.data.optional_columns
        with ThreadPoolExecutor(cfg.run.decode_threads) as pool, shards.progress("pair") as pbar:
            for i, start, end in shards.pending():
                rows = pickapic.read_rows(files, scan.kept[start:end], columns)
                if [pickapic.caption_key(r["caption"]) for r in rows] != scan.kept_captions[start:end]:
                    raise UserError(
                        f"data.source={cfg.data.source} changed while this job read it: run it again"
                    )
                new = [rows[k - start]["caption"] for k in texts.first_seen[i]]
                txt, pooled = encode_texts(new, encoder, cfg.run.batch_size, info)
                text_files = write_texts(out, i, txt, pooled)
                captions_done += len(new)
                samples, sk, sk_ids = encode_shard(i, rows, texts.refs[start:end], encoder, cfg, pool, pbar)
                if len(samples) + sum(sk.values()) != end - start:
                    raise RuntimeError(  # a bug, not bad input: never write a shard that loses rows silently
                        f"shard {i}: {len(samples)} pairs + {sum(sk.values())} skipped != {end - start} rows"
                    )
                record = {
                    "rows": [start, end],
                    "skipped": dict(sk),
                    "skipped_ids": sk_ids,
                    "text_files": text_files,
                }
                shards.write(i, samples, record)
                skipped.update(sk)
    shards.stop_clock()
    manifest = merge_manifest(out)
    return summary(shards, info, captions_done, skipped, manifest)
