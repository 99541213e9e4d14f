"""The sample stage's job (D3PO, part 1): prompts + a model -> trajectory shards of K images per
prompt (``pipeline.d3po.trajectories``) + a manifest.

``sample_trajectories`` is one job of a job array (``pipeline.data.jobs``): it reads and screens the
prompts, plans the shards (everything that decides their bytes, computed identically by every job),
and samples this job's unfinished ones with ``pipeline.d3po.sampler.TrajectorySampler``. Every random
draw of prompt i comes from a generator seeded by (sampler.seed, i), and batches never cross a
shard's edge, so any job layout writes byte-identical shards. The job that completes the folder
merges the manifest and writes the labelling service's index (``images.jsonl``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import CLIPTokenizer

from pipeline.config import to_dict
from pipeline.d3po import trajectories
from pipeline.d3po.sampler import (
    Screened,
    TrajectorySampler,
    make_scheduler,
    scheduler_config,
    screen_prompts,
)
from pipeline.data.jobs import ShardJob, job_of, open_job
from pipeline.data.manifest import shard_ranges
from pipeline.data.prompts import PromptList, read_prompt_source
from pipeline.data.shards import sha256_file
from pipeline.encoders import Encoder
from pipeline.errors import UserError
from pipeline.evaluate import unet_specs
from pipeline.io import npy_bytes
from pipeline.models import DTYPES, ModelInfo, inspect_model, load_unet, pick_device
from pipeline.schema.sample import SampleConfig


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
        "format": trajectories.FORMAT,
        "version": trajectories.VERSION,
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
    path = out / trajectories.UNCOND
    if not path.exists():
        txt, _ = encoder.encode_text([""])
        trajectories.write_once(path, npy_bytes(txt.cpu().numpy().astype(np.float16)))
    return trajectories.load_uncond(out, encoder.info.text_dim)


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
        seeds = [trajectories.group_seed(cfg.sampler.seed, p) for p in idx]
        results = sampler.sample(torch.from_numpy(txt), seeds)
        for p, prompt, seed, t_emb, res in zip(idx, texts, seeds, txt, results):
            key = trajectories.group_key(p, prompt)
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
            jpegs = [trajectories.jpeg_bytes(img, cfg.output.jpeg_quality) for img in res.images]
            samples.append(trajectories.encode_group(key, arrays, jpegs, meta))
        pbar.update(len(idx))
    return samples


def make_sampler(
    cfg: SampleConfig, info: ModelInfo, unet, vae, sched, uncond: np.ndarray, device
) -> TrajectorySampler:
    """The sampler of ``cfg.sampler``'s settings, with the folder's unconditional embedding."""
    h = cfg.sampler.resolution // info.vae_scale_factor
    return TrajectorySampler(
        unet,
        vae,
        sched,
        torch.from_numpy(uncond),
        eta=cfg.sampler.eta,
        guidance=cfg.sampler.guidance,
        images_per_prompt=cfg.sampler.images_per_prompt,
        latent_shape=(info.latent_channels, h, h),
        scaling_factor=info.scaling_factor,
        device=device,
        decode_batch=cfg.run.decode_batch,
    )


def summary(
    shards: ShardJob,
    cfg: SampleConfig,
    info: ModelInfo,
    plan: dict,
    prompts: PromptList,
    screened: Screened,
    manifest: dict | None,
) -> str:
    """The job's report: model and sampler, what it wrote, the skipped prompts, the manifest."""
    k = cfg.sampler.images_per_prompt
    pp = trajectories.pairs_per_group(k)
    unet = plan["model"]["unet"]
    before = [
        f"  model      {info.family.name}  {info.path}  unet: {unet['kind']} {unet['path']}",
        f"  sampler    {cfg.sampler.steps} DDIM steps, eta {cfg.sampler.eta}, guidance {cfg.sampler.guidance}, "
        f"K={k} images per prompt ({pp} pairs)",
    ]
    after = []
    if shards.written:
        groups = shards.items
        after.append(
            f"  this job   {groups} groups, {groups * pp} pairs, {shards.work_seconds / max(groups, 1):.2f} s/group, "
            f"{shards.bytes / max(groups * pp, 1) / 1024:.1f} KiB/pair"
        )
    if screened.skipped:
        after.append(
            f"  skipped    {dict(sorted(screened.skipped.items()))} of {len(prompts.prompts)} prompts"
        )
    manifest_lines = None
    if manifest is not None:
        c = manifest["counts"]
        manifest_lines = [
            f"  manifest   {shards.out / 'manifest.json'}: {len(manifest['shards'])} shards, {c['groups']} groups, "
            f"{c['pairs']} pairs of {c['prompts_read']} prompts",
            f"  size       {manifest['total_bytes'] / 2**20:.2f} MiB, {manifest['bytes_per_group'] / 1024:.1f} KiB/group, "
            f"{manifest['bytes_per_pair'] / 1024:.1f} KiB/pair",
        ]
    return shards.summary(before, after, manifest_lines)


def sample_trajectories(cfg: SampleConfig) -> str:
    """Run one sample job; returns its summary (what it wrote, the manifest once the folder is done)."""
    job = job_of(cfg.dist)
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
    prompts = read_prompt_source(cfg.prompts.source, cfg.prompts.max)
    screened = screen_prompts(
        prompts.prompts, CLIPTokenizer.from_pretrained(info.path, subfolder="tokenizer")
    )
    if not screened.kept:
        raise UserError(
            f"prompts.source={cfg.prompts.source}: no usable prompt in {len(prompts.prompts)} "
            f"(skipped: {screened.skipped})"
        )
    sched = make_scheduler(info.path, cfg.sampler.steps)
    plan = make_plan(cfg, info, spec, prompts, screened, scheduler_config(sched), sched.timesteps.tolist())
    # uncond.npy's temporaries are not this job's to remove: other jobs may be writing it
    shards = open_job("sample", cfg, job, plan, len(screened.kept), what="trajectories of another sample run")
    out = shards.out
    if shards.todo:
        device = pick_device(cfg.model.device, job.local_rank)
        encoder, unet = load_models(cfg, info, spec, device)
        uncond = write_uncond(out, encoder)
        uncond_sha = sha256_file(out / trajectories.UNCOND)
        sampler = make_sampler(cfg, info, unet, encoder.vae, sched, uncond, device)
        with shards.progress("group") as pbar:
            for i, start, end in shards.pending():
                samples = sample_shard(
                    i, screened.kept[start:end], prompts.prompts, encoder, sampler, cfg, pbar
                )
                if len(samples) != end - start:
                    raise RuntimeError(f"shard {i}: {len(samples)} groups for {end - start} prompts")  # a bug
                record = {
                    "groups": [start, end],
                    "uncond_sha256": uncond_sha,
                    "batch_size": cfg.run.batch_size,
                    "decode_batch": cfg.run.decode_batch,
                }
                shards.write(i, samples, record)
    shards.stop_clock()
    manifest = trajectories.merge_trajectories(out)
    return summary(shards, cfg, info, plan, prompts, screened, manifest)
