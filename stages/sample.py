"""Stage sample (D3PO, part 1): prompts + a model -> trajectory shards of K images per prompt + a manifest.

    python -m stages.sample --config configs/sample/sd15.yaml model.path=/models/sd15 \
        prompts.source=/data/prompts.txt output.dir=/trajectories/sd15-r0 [model.unet=/runs/d3po-r0]

Each prompt's K images start from the same initial noise and are sampled with DDIM at eta > 0 and
classifier-free guidance, keeping every latent and every transition's log-prob
(``pipeline.d3po.trajectories`` describes the format). Job arrays and restarts work as in the encode
stage: shard i belongs to job i % W, its prompts are a pure function of the prompt list and
``output.shard_size``, and every random draw of prompt i comes from a generator seeded by
(sampler.seed, i), so any job layout writes byte-identical shards; a restarted job skips the shards it
finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import cli
from pipeline.config import to_dict, write_resolved
from pipeline.d3po import trajectories as tj
from pipeline.d3po.sampler import (
    PromptList,
    Screened,
    TrajectorySampler,
    make_scheduler,
    read_prompts,
    scheduler_config,
    screen_prompts,
)
from pipeline.data.manifest import check_or_write_plan, shard_ranges
from pipeline.data.shards import finished_record, remove_stale_tmp, sha256_file, shard_name, write_shard
from pipeline.dist_env import job_info
from pipeline.encoders import Encoder
from pipeline.errors import UserError
from pipeline.evaluate import unet_specs
from pipeline.models import DTYPES, ModelInfo, inspect_model, load_unet, pick_device
from pipeline.schema.sample import SampleConfig

log = logging.getLogger("stages.sample")


def resolve_unet(path: str | None) -> unet_specs.UNetSpec | None:
    """``model.unet`` as a spec (None: the base folder's UNet). A run folder means its exported UNet,
    not its EMA exports; name one of those folders to sample from it."""
    if path is None:
        return None
    if not Path(path).exists():
        raise UserError(f"model.unet={path}: no such file or directory")
    try:
        specs = unet_specs.resolve("unet", path, include_ema=False)
    except UserError:
        raise UserError(
            f"model.unet={path}: not a UNet folder (config.json + diffusion_pytorch_model*.safetensors), "
            "a LoRA folder, checkpoints/step_N or a run folder (with export/)"
        ) from None
    if len(specs) != 1:
        raise UserError(
            f"model.unet={path}: holds {len(specs)} UNets ({', '.join(str(s.path) for s in specs)}); name one"
        )
    return specs[0]


def unet_identity(spec: unet_specs.UNetSpec | None, info: ModelInfo) -> dict:
    if spec is None:
        return {"kind": "base", "path": str(Path(info.path) / "unet")}
    return {"kind": spec.kind, "path": str(Path(spec.path).resolve())}


def make_plan(
    cfg: SampleConfig,
    info: ModelInfo,
    spec: unet_specs.UNetSpec | None,
    prompts: PromptList,
    screened: Screened,
    sched_cfg: dict,
    timesteps: list[int],
) -> dict:
    """Everything that decides the shards' bytes, computed identically by every job."""
    h = cfg.sampler.resolution // info.vae_scale_factor
    k, n = cfg.sampler.images_per_prompt, cfg.sampler.steps
    sample_cfg = to_dict(cfg)
    sample_cfg.pop("dist")
    sample_cfg.pop("run")  # batch sizes and re-hashing: how, not what
    sample_cfg["output"].pop("dir")
    kept_digest = hashlib.sha256(json.dumps([[i, prompts.prompts[i]] for i in screened.kept]).encode())
    return {
        "format": tj.FORMAT,
        "version": tj.VERSION,
        "model": {**info.as_dict(), "unet": unet_identity(spec, info)},
        "sampler": {
            "steps": n,
            "eta": cfg.sampler.eta,
            "guidance": cfg.sampler.guidance,
            "images_per_prompt": k,
            "resolution": cfg.sampler.resolution,
            "seed": cfg.sampler.seed,
            "seed_rule": "group seed = pipeline.d3po.trajectories.group_seed(seed, prompt_index)",
            "timesteps": [int(t) for t in timesteps],
            "scheduler": sched_cfg,
        },
        "shapes": {
            "latents": [k, n + 1, info.latent_channels, h, h],
            "log_probs": [k, n],
            "timesteps": [n],
            "txt": [77, info.text_dim],
            "uncond": [1, 77, info.text_dim],
            "image": [cfg.sampler.resolution, cfg.sampler.resolution, 3],
        },
        "dtypes": {
            "latents": "fp16",
            "log_probs": "fp32",
            "timesteps": "int64",
            "txt": "fp16",
            "uncond": "fp16",
        },
        "scaling_factor": info.scaling_factor,
        "sample_config": sample_cfg,
        "source": {
            "kind": prompts.kind,
            "files": [str(f.resolve()) for f in prompts.files],
            "rows_read": prompts.rows_read,
            "kept_prompts_sha256": kept_digest.hexdigest(),
        },
        "shard_size": cfg.output.shard_size,
        "n_shards": len(shard_ranges(len(screened.kept), cfg.output.shard_size)),
        "scan": {
            "prompts_read": len(prompts.prompts),
            "kept": len(screened.kept),
            "skipped": dict(sorted(screened.skipped.items())),
            "skipped_indices": dict(sorted(screened.skipped_indices.items())),
        },
    }


def load_models(cfg: SampleConfig, info: ModelInfo, spec, device: torch.device):
    """(Encoder with the VAE and the text encoder, the UNet to sample from), in eval mode on ``device``."""
    encoder = Encoder(info, device, DTYPES[cfg.model.vae_dtype], DTYPES[cfg.model.text_dtype])
    dtype = DTYPES[cfg.model.dtype]
    unet = load_unet(info.path, dtype) if spec is None else unet_specs.load(spec, info, dtype)
    c = unet.config
    if c.in_channels != info.latent_channels or c.cross_attention_dim != info.text_dim:
        raise UserError(
            f"model.unet={cfg.model.unet}: a UNet for {c.in_channels}-channel latents and text width "
            f"{c.cross_attention_dim}, but model.path={cfg.model.path} has {info.latent_channels} and "
            f"{info.text_dim}: give the base it was trained from"
        )
    return encoder, unet.to(device).eval()


def write_uncond(out: Path, encoder: Encoder) -> np.ndarray:
    """The empty prompt's embedding, stored once per folder (the first job's); every job samples with
    the stored one."""
    path = out / tj.UNCOND
    if not path.exists():
        txt, _ = encoder.encode_text([""])
        tj.write_once(path, tj.npy_bytes(txt.cpu().numpy().astype(np.float16)))
    return tj.load_uncond(out, encoder.info.text_dim)


def sample_shard(
    index: int,
    kept: list[int],
    prompts: list[str],
    encoder: Encoder,
    sampler: TrajectorySampler,
    cfg: SampleConfig,
    pbar: tqdm,
) -> list[dict[str, bytes]]:
    """The webdataset samples of one shard: its prompts (indices ``kept``), ``run.batch_size`` groups per
    sampler call. Batches never cross a shard's edge, so every job layout makes the same calls."""
    k = cfg.sampler.images_per_prompt
    settings = {
        "steps": cfg.sampler.steps,
        "eta": cfg.sampler.eta,
        "guidance": cfg.sampler.guidance,
        "images_per_prompt": k,
        "resolution": cfg.sampler.resolution,
        "seed": cfg.sampler.seed,
    }
    samples = []
    for b in range(0, len(kept), cfg.run.batch_size):
        idx = kept[b : b + cfg.run.batch_size]
        texts = [prompts[p] for p in idx]
        txt = encoder.encode_text(texts)[0].cpu().numpy().astype(np.float16)
        seeds = [tj.group_seed(cfg.sampler.seed, p) for p in idx]
        results = sampler.sample(torch.from_numpy(txt), seeds)
        for p, prompt, seed, t_emb, res in zip(idx, texts, seeds, txt, results):
            key = tj.group_key(p, prompt)
            meta = {
                "prompt": prompt,
                "prompt_index": p,
                "seed": seed,
                "shard": index,
                "images": [f"{key}/{j}" for j in range(k)],
                "sampler": settings,
            }
            arrays = {
                "latents": res.latents,
                "log_probs": res.log_probs,
                "timesteps": sampler.timesteps,
                "txt": t_emb,
            }
            jpegs = [tj.jpeg_bytes(img, cfg.output.jpeg_quality) for img in res.images]
            samples.append(tj.encode_group(key, arrays, jpegs, meta))
        pbar.update(len(idx))
    return samples


def main(cfg: SampleConfig) -> int:
    try:
        job = job_info(cfg.dist.rank, cfg.dist.world_size)
    except ValueError as e:
        raise UserError(str(e)) from e
    info = inspect_model(cfg.model.path)
    if info.family.name != "sd15":
        raise UserError(
            f"model.path={cfg.model.path}: a {info.family.name} model; the sample stage samples SD1.5 "
            "trajectories only so far (SDXL's pooled embedding and size ids are not stored yet)"
        )
    if cfg.sampler.resolution % info.vae_scale_factor:
        raise UserError(
            f"sampler.resolution={cfg.sampler.resolution} is not a multiple of the VAE factor {info.vae_scale_factor}"
        )
    spec = resolve_unet(cfg.model.unet)
    prompts = read_prompts(cfg.prompts.source, cfg.prompts.max)
    from transformers import CLIPTokenizer

    screened = screen_prompts(
        prompts.prompts, CLIPTokenizer.from_pretrained(info.path, subfolder="tokenizer")
    )
    if not screened.kept:
        raise UserError(
            f"prompts.source={cfg.prompts.source}: no usable prompt in {len(prompts.prompts)} "
            f"(skipped: {screened.skipped})"
        )
    sched = make_scheduler(info.path, cfg.sampler.steps)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    plan = make_plan(cfg, info, spec, prompts, screened, scheduler_config(sched), sched.timesteps.tolist())
    check_or_write_plan(out, plan, "trajectories of another sample run")
    write_resolved(cfg, out / "jobs" / f"job-{job.rank:05d}-of-{job.world_size:05d}.yaml")
    ranges = shard_ranges(len(screened.kept), cfg.output.shard_size)
    mine = [i for i in range(len(ranges)) if i % job.world_size == job.rank]
    stale = remove_stale_tmp(out, [shard_name(i) for i in mine])  # not uncond's: other jobs may be writing it
    todo = [i for i in mine if finished_record(out / shard_name(i), verify=cfg.run.verify_existing) is None]
    log.info(
        "job %d/%d (%s): %d of %d shards are this job's; %d already finished, %d to sample%s",
        job.rank, job.world_size, job.source, len(mine), len(ranges), len(mine) - len(todo), len(todo),
        f"; removed {stale} stale temporaries" if stale else "",
    )  # fmt: skip

    k = cfg.sampler.images_per_prompt
    written, groups_done, bytes_done = 0, 0, 0
    t_sample = time.time()
    if todo:
        device = pick_device(cfg.model.device, job.local_rank)
        encoder, unet = load_models(cfg, info, spec, device)
        uncond = write_uncond(out, encoder)
        uncond_sha = sha256_file(out / tj.UNCOND)
        h = cfg.sampler.resolution // info.vae_scale_factor
        sampler = TrajectorySampler(
            unet, encoder.vae, sched, torch.from_numpy(uncond),
            eta=cfg.sampler.eta, guidance=cfg.sampler.guidance, images_per_prompt=k,
            latent_shape=(info.latent_channels, h, h), scaling_factor=info.scaling_factor, device=device,
            decode_batch=cfg.run.decode_batch,
        )  # fmt: skip
        total = sum(ranges[i][1] - ranges[i][0] for i in todo)
        with tqdm(total=total, unit="group", desc=f"sample job {job.rank}") as pbar:
            for i in todo:
                start, end = ranges[i]
                samples = sample_shard(
                    i, screened.kept[start:end], prompts.prompts, encoder, sampler, cfg, pbar
                )
                if len(samples) != end - start:
                    raise RuntimeError(f"shard {i}: {len(samples)} groups for {end - start} prompts")  # a bug
                rec = write_shard(
                    out / shard_name(i),
                    samples,
                    {
                        "index": i,
                        "groups": [start, end],
                        "uncond_sha256": uncond_sha,
                        "batch_size": cfg.run.batch_size,
                        "decode_batch": cfg.run.decode_batch,
                    },
                )
                written += 1
                groups_done += rec["count"]
                bytes_done += rec["bytes"]
    dt = time.time() - t_sample
    manifest = tj.merge_manifest(out) if (out / tj.UNCOND).exists() else None
    if manifest is not None:  # complete: people can label it (python -m stages.label serve source=<out>)
        tj.write_label_index(out)

    pp = tj.pairs_per_group(k)
    lines = [
        f"sample job {job.rank} of {job.world_size} done in {time.time() - t0:.1f} s -> {out}",
        f"  model      {info.family.name}  {info.path}  unet: {plan['model']['unet']['kind']} {plan['model']['unet']['path']}",
        f"  sampler    {cfg.sampler.steps} DDIM steps, eta {cfg.sampler.eta}, guidance {cfg.sampler.guidance}, "
        f"K={k} images per prompt ({pp} pairs)",
        f"  shards     {written} written, {len(mine) - len(todo)} already finished (of {len(mine)} for this job, {len(ranges)} in all)",
    ]
    if written:
        lines.append(
            f"  this job   {groups_done} groups, {groups_done * pp} pairs, {dt / max(groups_done, 1):.2f} s/group, "
            f"{bytes_done / max(groups_done * pp, 1) / 1024:.1f} KiB/pair"
        )
    if screened.skipped:
        lines.append(
            f"  skipped    {dict(sorted(screened.skipped.items()))} of {len(prompts.prompts)} prompts"
        )
    if manifest is not None:
        c = manifest["counts"]
        lines.append(
            f"  manifest   {out / 'manifest.json'}: {len(manifest['shards'])} shards, {c['groups']} groups, "
            f"{c['pairs']} pairs of {c['prompts_read']} prompts"
        )
        lines.append(
            f"  size       {manifest['total_bytes'] / 2**20:.2f} MiB, {manifest['bytes_per_group'] / 1024:.1f} KiB/group, "
            f"{manifest['bytes_per_pair'] / 1024:.1f} KiB/pair"
        )
    else:
        lines.append(
            "  manifest   not yet: other jobs' shards are missing (the last job to finish writes it)"
        )
    print("\n".join(lines))
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run("python -m stages.sample", SampleConfig, main, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli_main())
