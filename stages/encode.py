"""Stage encode: Pick-a-Pic pairs -> webdataset shards of VAE latents and text embeddings + a manifest.

    python -m stages.encode --config configs/encode/sd15.yaml model.path=/models/sd15 \
        data.source=/data/pickapic/train output.dir=/shards/sd15

Run it as many independent jobs as you like (torchrun / deepspeed / SLURM set RANK and WORLD_SIZE,
or give dist.rank=R dist.world_size=W): shard i belongs to job i % W, and which rows go to shard i
does not depend on W. A restarted job skips the shards it finished and redoes the others.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import cli
from pipeline.config import to_dict, write_resolved
from pipeline.data import pickapic
from pipeline.data.images import ImageDecodeError, prepare
from pipeline.data.manifest import check_or_write_plan, merge_manifest, shard_ranges
from pipeline.data.shards import (
    FORMAT,
    VERSION,
    encode_sample,
    finished_record,
    pair_key,
    remove_stale_tmp,
    shard_name,
    write_shard,
)
from pipeline.data.text_store import plan_texts, pooled_name, text_name, write_texts
from pipeline.dist_env import job_info
from pipeline.encoders import Encoder
from pipeline.errors import UserError
from pipeline.models import DTYPES, ModelInfo, inspect_model, pick_device
from pipeline.schema.encode import EncodeConfig

log = logging.getLogger("stages.encode")
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
                    index, row["ranking_id"], bad,
                )  # fmt: skip
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


def main(cfg: EncodeConfig) -> int:
    try:
        job = job_info(cfg.dist.rank, cfg.dist.world_size)
    except ValueError as e:
        raise UserError(str(e)) from e
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
    plan = make_plan(cfg, info, scan)
    check_or_write_plan(out, plan)
    write_resolved(cfg, out / "jobs" / f"job-{job.rank:05d}-of-{job.world_size:05d}.yaml")
    ranges = shard_ranges(len(scan.kept), cfg.output.shard_size)
    mine = [i for i in range(len(ranges)) if i % job.world_size == job.rank]
    stale = remove_stale_tmp(out, [n for i in mine for n in (shard_name(i), text_name(i), pooled_name(i))])
    todo = [i for i in mine if finished_record(out / shard_name(i), verify=cfg.run.verify_existing) is None]
    log.info(
        "job %d/%d (%s): %d of %d shards are this job's; %d already finished, %d to encode%s",
        job.rank, job.world_size, job.source, len(mine), len(ranges), len(mine) - len(todo), len(todo),
        f"; removed {stale} stale temporaries" if stale else "",
    )  # fmt: skip

    texts = plan_texts(scan.kept_captions, ranges)
    written, pairs_done, bytes_done, captions_done, skipped = 0, 0, 0, 0, Counter()
    t_enc = time.time()
    if todo:
        device = pick_device(cfg.model.device, job.local_rank)
        encoder = Encoder(info, device, DTYPES[cfg.model.vae_dtype], DTYPES[cfg.model.text_dtype])
        total = sum(ranges[i][1] - ranges[i][0] for i in todo)
        with (
            ThreadPoolExecutor(cfg.run.decode_threads) as pool,
            tqdm(total=total, unit="pair", desc=f"encode job {job.rank}") as pbar,
        ):
            for i in todo:
                start, end = ranges[i]
                columns = ROW_COLUMNS + cfg.data.extra_columns + cfg.data.optional_columns
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
                rec = write_shard(
                    out / shard_name(i),
                    samples,
                    {
                        "index": i,
                        "rows": [start, end],
                        "skipped": dict(sk),
                        "skipped_ids": sk_ids,
                        "text_files": text_files,
                    },  # fmt: skip
                )
                written += 1
                pairs_done += rec["count"]
                bytes_done += rec["bytes"] + sum(t["bytes"] for t in text_files)
                skipped.update(sk)
    dt = time.time() - t_enc
    manifest = merge_manifest(out)

    lines = [
        f"encode job {job.rank} of {job.world_size} done in {time.time() - t0:.1f} s -> {out}",
        f"  model      {info.family.name}  {info.path}",
        f"  shards     {written} written, {len(mine) - len(todo)} already finished (of {len(mine)} for this job, {len(ranges)} in all)",
    ]
    if written:
        lines.append(
            f"  this job   {pairs_done} pairs, {pairs_done / max(dt, 1e-9):.2f} pairs/s, {bytes_done / max(pairs_done, 1) / 1024:.1f} KiB/pair, "
            f"{captions_done} distinct captions encoded"
        )
    if skipped:
        lines.append(f"  bad rows   {dict(skipped)}")
    if manifest is not None:
        c = manifest["counts"]
        lines.append(
            f"  manifest   {out / 'manifest.json'}: {len(manifest['shards'])} shards, {c['pairs']} pairs of {c['rows_read']} rows"
        )
        lines.append(f"  skipped    {c['skipped']}")
        lines.append(
            f"  size       {manifest['total_bytes'] / 2**20:.2f} MiB, {manifest['total_bytes'] / max(c['pairs'], 1) / 1024:.1f} KiB/pair"
        )
    else:
        lines.append(
            "  manifest   not yet: other jobs' shards are missing (the last job to finish writes it)"
        )
    print("\n".join(lines))
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run("python -m stages.encode", EncodeConfig, main, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli_main())
