"""The one check a person with a GPU runs: does this project work on this machine, and what does it cost?

    make gpu-check                                # = python -m tools.benchmarks.gpu_check --out gpu_check
    python -m tools.benchmarks.gpu_check --out DIR [--cpu] [--only NAME ...] [--skip NAME ...]

Each line below passes, fails (with the reason) or is skipped (with the reason); the run writes
``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (a table to paste into BENCHMARKS.md) and exits 1 when a
line failed. Under 10 minutes on one GPU. Every line uses the project's own commands on tiny models and
toy data that the project builds itself (no downloads), except the full-size lines, which build
randomly initialised SD1.5 / SDXL-shaped UNets in memory.

- ``environment``: versions, the GPU, its compute capability; the run's precision (fp16 below sm_80,
  bf16 from sm_80; fp32 in CPU mode).
- ``attention``: SDPA and xformers forward + backward at the UNet head dims (SD1.5: 40, 80, 160; SDXL:
  64) in the run's dtype, compared with each other; the trainer's xformers probe.
- ``optimizer``: torch's fused AdamW on the device against the reference implementation.
- ``encode_sd15``, ``encode_sdxl``: tiny models, VAE in fp16 and fp32 (SDXL's VAE is upcast), finite.
- ``adaptive_resume``: Adaptive-DPO, 6 steps in the run's precision, xformers, gradient checkpointing,
  grad_accum 2, two offloaded EMA models; killed after step 4, resumed: bit-identical to uninterrupted.
- ``host_syncs``: the host syncs of each training micro-step (CUDA's sync debug mode; Adaptive-DPO,
  two EMA models, grad_accum 4): one inside an optimizer step (the finite-loss check).
- ``lora``: LoRA train + export + evaluate.
- ``d3po``: sample + feedback + 2 D3PO steps (loss log 2 at step 1).
- ``multi_gpu`` (2+ GPUs; 2 gloo processes in CPU mode): the tiny run under torchrun with checkpoints
  (NCCL), then resumed on one device through the universal checkpoint.
- ``full_sd15``, ``full_sdxl`` (GPU only): random-weight steps of full-size UNets at the shipped micro-
  batches with gradient checkpointing and grad_accum 4: DPO, Adaptive-DPO (two EMA models, resident
  buffers and one shared buffer) and, for SD1.5, D3PO (CFG, one DDIM transition per image) step time, model-FLOP utilisation, EMA gathers per step, and
  ``max_memory_allocated`` / ``max_memory_reserved`` against 16, 32, 40 and 80 GB; SD1.5 also with the
  EMA shards on the GPU and with ZeRO-1.

``--cpu`` (automatic without CUDA) runs the same script on the CPU with gloo and fp32 at the smallest
sizes, so that it cannot rot: CI runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GB_TARGETS = (16, 32, 40, 80)


class Skip(Exception):
    """A check that cannot run here (the reason is the message)."""


class Context:
    def __init__(self, out: Path, cpu: bool):
        import torch

        self.out = out
        self.cpu = cpu
        self.cuda = not cpu and torch.cuda.is_available()
        self.n_gpus = torch.cuda.device_count() if self.cuda else 0
        cap = torch.cuda.get_device_capability(0) if self.cuda else (0, 0)
        self.capability = cap
        self.precision = "fp32" if not self.cuda else ("bf16" if cap[0] >= 8 else "fp16")
        self.device = "cuda" if self.cuda else "cpu"
        self.attention = "xformers" if self.cuda and _has_xformers() else "sdpa"
        self._models: dict[str, Path] = {}
        self._data: Path | None = None

    # ------------------------------------------------------------------ shared fixtures

    def env(self, **extra) -> dict[str, str]:
        e = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if self.cpu:
            e.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            e.pop(k, None)
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def run(self, args: list[str], log: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
        """``python -m ...`` as a user would; the output goes to DIR/logs/<log>.log; raises on failure."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{log}.log", "a") as f:
            f.write(f"\n$ python -m {' '.join(args)}\n")
            f.flush()
            p = subprocess.run(
                [sys.executable, "-m", *args],
                cwd=ROOT,
                env=self.env(**env),
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        if p.returncode:
            tail = (logs / f"{log}.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"`python -m {' '.join(args[:1])}` exit {p.returncode}: " + " | ".join(tail))
        return p

    def model(self, family: str) -> Path:
        if family not in self._models:
            path = self.out / "models" / family
            if not (path / "model_index.json").is_file():
                self.run(["tools.toy.make_tiny_model", "--family", family, "--out", str(path)], "models")
            self._models[family] = path
        return self._models[family]

    def data(self) -> Path:
        if self._data is None:
            d = self.out / "pickapic"
            if not d.is_dir():
                self.run(
                    [
                        "tools.toy.make_pickapic",
                        "--out",
                        str(d),
                        "--pairs",
                        "48",
                        "--seed",
                        "0",
                        "--tie-rate",
                        "0",
                        "--unlabelled-rate",
                        "0",
                        "--identical-rate",
                        "0",
                    ],
                    "data",
                )
            self._data = d
        return self._data

    def shards(self, family: str, vae_dtype: str = "fp32") -> Path:
        out = self.out / "shards" / f"{family}_{vae_dtype}"
        if not (out / "manifest.json").is_file():
            self.run(
                [
                    "stages.encode",
                    "--config",
                    "configs/encode/tiny.yaml",
                    f"model.path={self.model(family)}",
                    f"data.source={self.data()}",
                    f"output.dir={out}",
                    "output.shard_size=16",
                    f"model.device={self.device}",
                    f"model.vae_dtype={vae_dtype}",
                ],
                f"encode_{family}",
            )
        return out

    def train_args(self, shards: Path, out: Path, *extra: str) -> list[str]:
        return [
            "stages.train",
            "--config",
            "configs/train/tiny_dpo.yaml",
            f"data.shards={shards}",
            f"output.dir={out}",
            "data.micro_batch=4",
            f"train.device={self.device}",
            f"train.precision={self.precision}",
            f"model.attention={self.attention}",
            "output.tensorboard=false",
            *extra,
        ]


def _has_xformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("xformers") is not None


# ---------------------------------------------------------------------------------------------- checks


def check_environment(ctx: Context) -> dict:
    import deepspeed
    import diffusers
    import torch
    import transformers

    figs = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "precision": ctx.precision,
        "attention": ctx.attention,
        "mode": "cpu" if ctx.cpu else "gpu",
    }
    if _has_xformers():
        import xformers

        figs["xformers"] = xformers.__version__
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        figs |= {
            "gpu": p.name,
            "gpus": ctx.n_gpus,
            "capability": f"{ctx.capability[0]}.{ctx.capability[1]}",
            "memory_gb": round(p.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        }
    else:
        figs["cpu"] = platform.processor() or platform.machine()
    return figs


def check_attention(ctx: Context) -> dict:
    """SDPA vs xformers forward + backward per head dim, max |difference| relative to the output scale."""
    import torch
    import torch.nn.functional as F

    from pipeline.models import DTYPES

    dev = torch.device(ctx.device)
    dtype = DTYPES[ctx.precision]
    figs: dict = {}
    failures = []
    for d, heads, seq in ((40, 8, 4096), (80, 8, 1024), (160, 8, 256), (64, 10, 1024)):
        if ctx.cpu:
            seq = 64
        g = torch.Generator(device=dev).manual_seed(d)
        q, k, v = (
            torch.randn(2, heads, seq, d, device=dev, dtype=dtype, generator=g).requires_grad_()
            for _ in range(3)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out.float().square().sum().backward()
        ref = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
        row = {"sdpa": "ok"}
        if ctx.attention == "xformers":
            import xformers.ops as xops

            q2, k2, v2 = (t.detach().clone().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            try:
                o2 = xops.memory_efficient_attention(q2, k2, v2)
                o2.float().square().sum().backward()
                got = [
                    o2.detach().transpose(1, 2).float(),
                    q2.grad.transpose(1, 2).float(),
                    k2.grad.transpose(1, 2).float(),
                    v2.grad.transpose(1, 2).float(),
                ]
                rel = max(
                    float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(got, ref)
                )
                row |= {"xformers": "ok", "max_rel_diff": rel}
                if not math.isfinite(rel) or rel > (5e-2 if dtype != torch.float32 else 1e-3):
                    failures.append(f"head dim {d}: xformers differs from SDPA by {rel:.2g} (relative)")
            except Exception as e:  # a wheel for another torch, or no kernel for this dtype / head dim
                row["xformers"] = f"{type(e).__name__}: {e}"[:200]
                failures.append(f"head dim {d}: xformers failed ({row['xformers']})")
        figs[f"head_dim_{d}"] = row
    from pipeline.engine.precision import resolve_attention

    figs["trainer_choice_sd15"] = resolve_attention("auto", dev, dtype, [40, 80, 160])
    figs["trainer_choice_sdxl"] = resolve_attention("auto", dev, dtype, [64])
    if failures:
        raise RuntimeError("; ".join(failures))
    return figs


def check_optimizer(ctx: Context) -> dict:
    """torch's fused AdamW (the trainer's default on CUDA) against the reference for-loop implementation."""
    import torch

    dev = torch.device(ctx.device)
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(10_000, generator=g)
    grads = [torch.randn(10_000, generator=g) for _ in range(5)]
    res = {}
    for impl in ("fused", "foreach_off"):
        p = torch.nn.Parameter(w0.clone().to(dev))
        kw = {"fused": True} if impl == "fused" else {"foreach": False}
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, **kw)
        for gr in grads:
            p.grad = gr.to(dev)
            opt.step()
        res[impl] = p.detach().cpu()
    diff = float((res["fused"] - res["foreach_off"]).abs().max())
    if not diff < 1e-5:
        raise RuntimeError(f"fused AdamW differs from the reference by {diff:.3g}")
    return {"max_abs_diff": diff, "impl": "torch.optim.AdamW(fused=True)"}


def _latents_finite(shards: Path) -> int:
    """Pairs in the shards; raises if a latent is not finite."""
    import io
    import tarfile

    import numpy as np

    n = 0
    for tar in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith((".lat_w.npy", ".lat_l.npy")):
                    a = np.load(io.BytesIO(t.extractfile(m).read()))
                    if not np.isfinite(a).all():
                        raise RuntimeError(f"{tar.name}/{m.name}: non-finite latent")
                    n += m.name.endswith(".lat_w.npy")
    if n == 0:
        raise RuntimeError(f"{shards}: no pairs written")
    return n


def _encode(ctx: Context, family: str) -> dict:
    figs = {}
    for vae_dtype in ("fp32",) if ctx.cpu else ("fp32", "fp16"):
        t = time.perf_counter()
        figs[f"pairs_vae_{vae_dtype}"] = _latents_finite(ctx.shards(family, vae_dtype))
        figs[f"seconds_vae_{vae_dtype}"] = round(time.perf_counter() - t, 1)
    return figs


def check_encode_sd15(ctx: Context) -> dict:
    return _encode(ctx, "sd15")


def check_encode_sdxl(ctx: Context) -> dict:
    return _encode(ctx, "sdxl")


def _metrics(run: Path) -> list[dict]:
    from pipeline.metrics_log import read_metrics

    return read_metrics(run / "metrics.jsonl")


def _same_exports(a: Path, b: Path) -> list[str]:
    """Names of exported weight files whose tensors are not bit-identical."""
    from safetensors.torch import load_file

    differ = []
    for f in sorted(a.rglob("*.safetensors")):
        ta, tb = load_file(str(f)), load_file(str(b / f.relative_to(a)))
        if set(ta) != set(tb) or not all(ta[k].equal(tb[k]) for k in ta):
            differ.append(str(f.relative_to(a)))
    return differ


def check_adaptive_resume(ctx: Context) -> dict:
    shards = ctx.shards("sd15")
    common = [
        "objective.name=adaptive_dpo",
        "ema.decays=[0.9,0.5]",
        "ema.offload=true",
        "train.grad_accum=2",
        "model.gradient_checkpointing=true",
        "train.max_steps=6",
        "checkpoint.every=2",
        "checkpoint.keep=4",
        "train.loss_scale.initial_power=8",
    ]
    ref = ctx.out / "runs" / "adaptive_uninterrupted"
    ctx.run(ctx.train_args(shards, ref, *common), "adaptive_resume")
    run = ctx.out / "runs" / "adaptive_killed"
    logs = ctx.out / "logs"
    with open(logs / "adaptive_resume.log", "a") as f:  # start, SIGKILL once step 4's checkpoint is complete
        p = subprocess.Popen(
            [sys.executable, "-m", *ctx.train_args(shards, run, *common)],
            cwd=ROOT,
            env=ctx.env(),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        latest = run / "checkpoints" / "latest"
        deadline = time.monotonic() + 600
        while p.poll() is None and time.monotonic() < deadline:
            if latest.is_file() and latest.read_text().strip() == "step_00000004":
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        p.wait()
    if p.returncode != -signal.SIGKILL:
        raise RuntimeError(
            f"the run to kill ended by itself (exit {p.returncode}) before step 4's checkpoint"
        )
    ctx.run(ctx.train_args(shards, run, *common), "adaptive_resume")
    a, b = _metrics(ref), _metrics(run)
    if [r["step"] for r in b] != list(range(1, 7)) or [r["step"] for r in a] != list(range(1, 7)):
        raise RuntimeError(f"steps {[r['step'] for r in b]} after the restart")
    from pipeline.metrics_log import PROCESS_METRICS  # what a restart may change

    diffs = [
        (ra["step"], k) for ra, rb in zip(a, b) for k in set(ra) - set(PROCESS_METRICS) if ra[k] != rb.get(k)
    ]
    differ = _same_exports(ref / "export", run / "export")
    if diffs or differ:
        raise RuntimeError(f"the resumed run differs: metrics {diffs[:4]}, exports {differ}")
    return {
        "steps": 6,
        "killed_after_step": 4,
        "final_loss": a[-1]["loss"],
        "skipped_steps": a[-1].get("skipped_steps", 0),
        "step_time_s": a[-1]["step_time_s"],
        "bit_identical": True,
    }


def check_host_syncs(ctx: Context) -> dict:
    """The hot loop's host syncs per micro-step (tools.benchmarks.host_syncs: on CUDA, the sync debug mode):
    Adaptive-DPO with two EMA models, grad_accum 4. A micro-step inside an optimizer step may make one
    (the finite-loss check)."""
    shards = ctx.shards("sd15")
    run = ctx.out / "runs" / "host_syncs"
    args = ctx.train_args(
        shards,
        run,
        "objective.name=adaptive_dpo",
        "ema.decays=[0.9,0.5]",
        "train.grad_accum=4",
        "train.max_steps=3",
        "checkpoint.every=3",
        "checkpoint.export=false",
    )
    ctx.run(["tools.benchmarks.host_syncs", *args[1:]], "host_syncs")
    line = next(
        x
        for x in (ctx.out / "logs" / "host_syncs.log").read_text().splitlines()[::-1]
        if x.startswith("SYNCS ")
    )
    per_step = json.loads(line.split(" ", 1)[1])
    inner = [r for r in per_step if r["micro_step"] % 4 != 3]
    boundary = [r for r in per_step if r["micro_step"] % 4 == 3]
    worst = max(inner, key=lambda r: len(r["ops"]))
    if len(worst["ops"]) > 1:
        raise RuntimeError(
            f"micro-step {worst['micro_step']} waits {len(worst['ops'])} times: {worst['ops'][:6]}"
        )
    return {
        "micro_steps": len(per_step),
        "syncs_per_inner_micro_step": max(len(r["ops"]) for r in inner),
        "syncs_per_boundary_micro_step": max(len(r["ops"]) for r in boundary) if boundary else None,
        "where": sorted({op for r in inner for op in r["ops"]}),
    }


def check_lora(ctx: Context) -> dict:
    shards = ctx.shards("sd15")
    run = ctx.out / "runs" / "lora"
    ctx.run(
        ctx.train_args(
            shards, run, "model.lora_rank=4", "optim.lr=1e-3", "train.max_steps=3", "checkpoint.every=3"
        ),
        "lora",
    )
    report = ctx.out / "report_lora"
    ctx.run(
        [
            "stages.evaluate",
            "--config",
            "configs/eval/tiny.yaml",
            f"output={report}",
            f"device={ctx.device}",
            f"models.unets.lora={run}",
            f"preference.shards={shards}",
            "generation.prompts=prompts/toy.txt",
            "generation.max_prompts=2",
            "generation.steps=2",
        ],
        "lora",
    )
    res = json.loads((report / "report.json").read_text())
    return {"exported": sorted(p.name for p in (run / "export").iterdir()), "report_keys": sorted(res)[:6]}


def check_d3po(ctx: Context) -> dict:
    d = ctx.out / "d3po"
    d.mkdir(parents=True, exist_ok=True)
    prompts = d / "prompts.txt"
    prompts.write_text("a red cat\na blue house\na green tree\na yellow car\n")
    traj, fb, run = d / "trajectories", d / "feedback", d / "run"
    ctx.run(
        [
            "stages.sample",
            "--config",
            "configs/sample/tiny.yaml",
            f"model.path={ctx.model('sd15')}",
            f"prompts.source={prompts}",
            f"output.dir={traj}",
            f"model.device={ctx.device}",
        ],
        "d3po",
    )
    ctx.run(
        ["stages.feedback", "--config", "configs/feedback/tiny.yaml", f"trajectories={traj}", f"out={fb}"],
        "d3po",
    )
    ctx.run(
        [
            "stages.train",
            "--config",
            "configs/train/tiny_d3po.yaml",
            f"data.shards={traj}",
            f"data.preferences={fb}",
            f"output.dir={run}",
            "train.max_steps=2",
            f"train.device={ctx.device}",
            f"train.precision={ctx.precision}",
            f"model.attention={ctx.attention}",
            "output.tensorboard=false",
        ],
        "d3po",
    )
    m = _metrics(run)
    if abs(m[0]["loss"] - math.log(2)) > 1e-4:
        raise RuntimeError(f"D3PO loss at step 1 is {m[0]['loss']}, not log 2 (policy == reference)")
    return {"steps": len(m), "loss_step1": m[0]["loss"], "loss_step2": m[-1]["loss"]}


def check_multi_gpu(ctx: Context) -> dict:
    if not ctx.cpu and ctx.n_gpus < 2:
        raise Skip("one GPU: the NCCL path needs 2 or more")
    shards = ctx.shards("sd15")
    run = ctx.out / "runs" / "two_ranks"
    args = ctx.train_args(
        shards,
        run,
        "objective.name=adaptive_dpo",
        "ema.decays=[0.9]",
        "data.micro_batch=2",
        "checkpoint.every=2",
        "train.max_steps=2",
    )
    ctx.run(["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", *args], "multi_gpu")
    ctx.run([*args[:-1], "train.max_steps=3"], "multi_gpu", CUDA_VISIBLE_DEVICES="" if ctx.cpu else "0")
    if not (run / "checkpoints" / "universal" / "step_00000002" / "done").is_file():
        raise RuntimeError("the 1-device resume did not go through the universal checkpoint")
    m = _metrics(run)
    if [r["step"] for r in m] != [1, 2, 3] or not math.isfinite(m[-1]["loss"]):
        raise RuntimeError(f"steps {[r['step'] for r in m]}, last loss {m[-1]['loss']}")
    return {
        "ranks": 2,
        "backend": "gloo" if ctx.cpu else "nccl",
        "resumed_on": 1,
        "loss_step3": m[-1]["loss"],
    }


def _full(ctx: Context, shape: str) -> dict:
    """tools.benchmarks.bench's step on a full-size random-weight UNet at the shipped micro-batch (grad ckpt
    on), grad_accum 4: DPO, Adaptive-DPO with two offloaded EMA models (resident buffers, and one shared
    buffer as before issue 25); for SD1.5 also the EMA shards on the GPU and ZeRO-1."""
    from pipeline.config import load_config
    from pipeline.schema.train import TrainConfig

    cfg_file = ROOT / "configs" / "train" / f"{shape}_dpo.yaml"
    micro = load_config(TrainConfig, cfg_file, ["data.shards=x", "output.dir=x"]).data.micro_batch
    if ctx.cpu:  # the code path only: one timed step after the warm-up
        width, latent, micro, steps = 0.125, 16, 1, 1
    else:
        width, latent, steps = 1.0, 64 if shape == "sd15" else 128, 3
    accum = 4

    def bench(tag: str, objectives: list[str], *extra: str) -> dict:
        out = ctx.out / f"bench_{shape}{tag}.json"
        ctx.run(
            [
                "tools.benchmarks.bench",
                "step",
                "--shape",
                shape,
                "--width",
                str(width),
                "--latent",
                str(latent),
                "--micro-batch",
                str(micro),
                "--grad-accum",
                str(accum),
                "--precision",
                ctx.precision,
                "--attention",
                ctx.attention,
                "--grad-ckpt",
                "--steps",
                str(steps),
                "--skip-usual",
                "--skip-breakdown",
                "--objectives",
                *objectives,
                "--device",
                ctx.device,
                "--out",
                str(out),
                *extra,
            ],
            f"full_{shape}",
            timeout=900,
        )
        return json.loads(out.read_text())["result"]

    r = bench("", ["dpo", "adaptive_m3", "adaptive_m3_shared", *(["d3po"] if shape == "sd15" else [])])
    figs = {
        "micro_batch": micro,
        "grad_accum": accum,
        "width": width,
        "latent": latent,
        "unet_params_m": round(r["unet_params"] / 1e6),
    }
    for name in ("dpo", "adaptive_m3", "adaptive_m3_shared", "d3po"):
        if name not in r:
            continue
        figs[f"{name}_step_s"] = round(r[name]["step_s"], 4)
        figs[f"{name}_mfu"] = None if r[name]["mfu"] is None else round(r[name]["mfu"], 3)
    for name in ("adaptive_m3", "adaptive_m3_shared"):
        figs[f"{name}_over_dpo"] = round(r[name]["ratio_to_dpo"], 3)
        figs[f"{name}_ema_gathers_per_step"] = r[name].get("ema_gathers_per_step")
    mem = r.get("memory") or {}
    for k in ("max_allocated_gb", "max_reserved_gb"):
        if k in mem:
            figs[k] = round(mem[k], 2)
    if "max_reserved_gb" in mem:
        figs["fits_gb"] = [g for g in GB_TARGETS if mem["max_reserved_gb"] < 0.95 * g]
    if shape == "sd15":
        variants = [("ema_on_gpu", ["--no-offload"])] if ctx.cuda else []  # the same as offload on a CPU
        for tag, extra in [*variants, ("zero1", ["--zero-stage", "1"])]:
            try:
                v = bench(f"_{tag}", ["dpo", "adaptive_m3"], *extra)
            except RuntimeError as e:  # e.g. out of memory: say so, keep the main figures
                figs[f"{tag}_error"] = str(e)[-300:]
                continue
            figs[f"{tag}_dpo_step_s"] = round(v["dpo"]["step_s"], 4)
            figs[f"{tag}_adaptive_m3_over_dpo"] = round(v["adaptive_m3"]["ratio_to_dpo"], 3)
            if "memory" in v:
                figs[f"{tag}_max_reserved_gb"] = round(v["memory"]["max_reserved_gb"], 2)
    return figs


def check_full_sd15(ctx: Context) -> dict:
    return _full(ctx, "sd15")


def check_full_sdxl(ctx: Context) -> dict:
    return _full(ctx, "sdxl")


CHECKS: dict[str, Callable[[Context], dict]] = {
    "environment": check_environment,
    "attention": check_attention,
    "optimizer": check_optimizer,
    "encode_sd15": check_encode_sd15,
    "encode_sdxl": check_encode_sdxl,
    "adaptive_resume": check_adaptive_resume,
    "host_syncs": check_host_syncs,
    "lora": check_lora,
    "d3po": check_d3po,
    "multi_gpu": check_multi_gpu,
    "full_sd15": check_full_sd15,
    "full_sdxl": check_full_sdxl,
}


def _markdown(results: list[dict], env: dict) -> str:
    head = ", ".join(f"{k} {v}" for k, v in env.items())
    lines = [
        f"`python -m tools.benchmarks.gpu_check` on {head}",
        "",
        "| check | result | seconds | figures |",
        "|---|---|---|---|",
    ]
    for r in results:
        figs = (
            "; ".join(f"{k} {v}" for k, v in r.get("figures", {}).items())
            if r["status"] == "pass"
            else r["detail"]
        )
        figs = " ".join(str(figs).replace("|", "/").split())  # one table row
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {figs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.benchmarks.gpu_check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", default="gpu_check")
    p.add_argument(
        "--cpu", action="store_true", help="CPU mode (gloo, fp32, smallest sizes); automatic without CUDA"
    )
    p.add_argument("--only", nargs="*", choices=list(CHECKS), help="run these checks only")
    p.add_argument("--skip", nargs="*", choices=list(CHECKS), default=[], help="skip these checks")
    a = p.parse_args(argv)
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out, cpu=a.cpu or not torch.cuda.is_available())
    results, env = [], {}
    names = [n for n in (a.only or CHECKS) if n not in a.skip]
    for name in names:
        t = time.perf_counter()
        row: dict = {"name": name}
        try:
            if name.startswith("full_") and ctx.cpu and not a.cpu:
                raise Skip("no CUDA device")
            row |= {"status": "pass", "figures": CHECKS[name](ctx), "detail": ""}
        except Skip as e:
            row |= {"status": "skip", "detail": str(e)}
        except Exception as e:
            row |= {"status": "fail", "detail": f"{type(e).__name__}: {e}"[:1500]}
            (out / "logs").mkdir(exist_ok=True)
            (out / "logs" / f"{name}.traceback").write_text(traceback.format_exc())
        row["seconds"] = time.perf_counter() - t
        if name == "environment" and row["status"] == "pass":
            env = {
                k: row["figures"][k]
                for k in ("gpu", "capability", "torch", "precision", "mode")
                if k in row["figures"]
            }
        results.append(row)
        print(
            f"{row['status'].upper():4}  {name:<16} {row['seconds']:6.1f} s  "
            f"{row['detail'] or json.dumps(row.get('figures', {}))[:150]}",
            flush=True,
        )
    (out / "gpu_check.json").write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
    (out / "gpu_check.md").write_text(_markdown(results, env))
    failed = [r["name"] for r in results if r["status"] == "fail"]
    print(
        f"\n{len(results) - len(failed)} of {len(results)} passed or skipped; "
        f"{'failed: ' + ', '.join(failed) if failed else 'no failures'}. {out / 'gpu_check.md'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
