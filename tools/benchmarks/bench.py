"""Measure the pipeline on the machine at hand; JSON out, a table printed.

    python -m tools.benchmarks.bench step    [--width 0.25] [--latent 32] [--micro-batch 1] [--precision fp32]
                                  [--attention sdpa] [--steps 3] [--peak-tflops X] [--grad-ckpt]
    python -m tools.benchmarks.bench encode  [--model sd15|tiny] [--resolution 512] [--pairs 2]
    python -m tools.benchmarks.bench loader  --shards DIR | --synthetic sd15|sdxl [--workers 2] [--micro-batch 4] [--batches 200]
    python -m tools.benchmarks.bench memory  [--width 1.0] [--latent 64] [--precision fp16] [--memory-gb 16 32] [--grad-ckpt]  (CUDA)
    python -m tools.benchmarks.bench export  [--width 0.25] [--latent 32]   (peak host memory per rank while exporting; CPU)
    ... --out bench/NAME.json
    torchrun --standalone --nproc_per_node 2 -m tools.benchmarks.bench step|export ... [--overlap-gather]   (several ranks)

``step`` runs the real training step (PreferenceStep + DeepSpeed ZeRO-2 engine + sharded EMA) on a
randomly initialised SD1.5-shaped UNet (``--width`` scales its channels; 1.0 is the real 860M) with
synthetic latents, for DPO, Adaptive-DPO with M = 2 and M = 3, and "the usual way" (VAE + text
encoder inside the step, from pixels, as the public Diffusion-DPO scripts do). Model FLOPs come from
torch.utils.flop_counter on the UNet forward; backward counts twice the forward. The compute floor of
a step in UNet-forward units: DPO 3 (policy) + 1 (reference) = 4; each EMA model adds 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data.loader import PairStream, make_loader
from pipeline.data.manifest import merge_manifest, shard_ranges
from pipeline.data.shards import (
    FORMAT,
    VERSION,
    encode_sample,
    load_manifest,
    shard_name,
    write_json_atomic,
    write_shard,
)
from pipeline.data.text_store import npy_bytes, plan_texts, write_texts
from pipeline.engine.build import build_ema, build_models
from pipeline.engine.context import RunContext
from pipeline.engine.dist import all_gather_object, barrier, init_distributed
from pipeline.engine.precision import COMPUTE_DTYPE, flush_denormals
from pipeline.errors import UserError
from pipeline.export import export_models
from pipeline.losses.diffusion import run_unet
from pipeline.losses.noise_model import FlipRateEstimator
from pipeline.losses.objectives import build_objective
from pipeline.schema.objective import NoiseConfig, ObjectiveConfig
from pipeline.schema.train import TrainConfig, TrainData, TrainOutput
from pipeline.train.pair_step import PreferenceStep
from tools.benchmarks.bench_models import clip_l_text, n_params, sd15_unet, sd15_vae, sdxl_unet
from tools.toy.make_tiny_model import _text_config, _vae


def _device(name: str) -> torch.device:
    return torch.device(
        "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)
    )


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timeit(fn, dev, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t)
    return out


def _peak_mem(dev) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def measured_peak_tflops(dev: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """What this device reaches on a large square GEMM in ``dtype``: the practical peak used for
    utilisation when no published peak is given (``--peak-tflops``)."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    t = statistics.median(_timeit(lambda: a @ b, dev, reps))
    return 2 * n**3 / t / 1e12


def unet_forward_flops(unet, x, t, text, added: dict | None = None) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added)
    return fc.get_total_flops()


# ---------------------------------------------------------------------------------------------- step


def _unet_factory(width: float, latent: int, shape: str = "sd15"):
    """factory(dtype): a randomly initialised SD1.5- or SDXL-shaped UNet, the same weights at every call."""
    make = {"sd15": sd15_unet, "sdxl": sdxl_unet}[shape]
    state = {k: v.clone() for k, v in make(width, latent).state_dict().items()}

    def factory(dtype: torch.dtype) -> torch.nn.Module:
        m = make(width, latent)
        m.load_state_dict(state)
        return m.to(dtype)

    return factory


def bench_step(a) -> dict:
    info = init_distributed(_device(a.device).type)  # this rank's device (LOCAL_RANK), the process group
    ctx = RunContext(info.rank, info.world, info.device, COMPUTE_DTYPE[a.precision], a.attention)
    world, dev, dtype = ctx.world, ctx.device, ctx.dtype
    if a.memory_fraction and dev.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(a.memory_fraction)
    if a.peak_tflops is None:
        a.peak_tflops = measured_peak_tflops(dev, dtype)
    torch.manual_seed(0)
    B, L = a.micro_batch, a.latent
    cfg = TrainConfig(data=TrainData(shards="-", micro_batch=B), output=TrainOutput(dir="-"))
    cfg.train.precision, cfg.model.gradient_checkpointing = a.precision, a.grad_ckpt
    cfg.ema.offload, cfg.ema.overlap_gather = a.offload, a.overlap_gather
    cfg.train.zero_stage = a.zero_stage
    cfg.train.grad_accum = a.grad_accum  # a timed step is grad_accum micro-steps and one optimizer step
    factory = _unet_factory(a.width, L, a.shape)
    # the trainer's own construction: engine, reference, EMA models (pipeline.engine.build)
    built = build_models(cfg, factory, ctx, needs_reference=True)
    engine, ref, layout = built.engine, built.reference, built.layout
    names = a.objectives
    emas = {
        m: build_ema(cfg, factory, layout, None, ctx, [0.9999, 0.5][: m - 1])
        for m in (2, 3)
        if f"adaptive_m{m}" in names
    }
    if "adaptive_m3_shared" in names:  # the same two EMA models in one shared buffer (ema.resident false)
        shared = copy.deepcopy(cfg)
        shared.ema.resident = False
        emas["3_shared"] = build_ema(shared, factory, layout, None, ctx, [0.9999, 0.5])
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    text_dim = 2048 if a.shape == "sdxl" else 768
    batch = {"latents": torch.randn(2 * B, 4, L, L), "text": torch.randn(B, 77, text_dim)}
    added = None
    if a.shape == "sdxl":  # pooled text embedding and size/crop ids, as the loader gives them
        batch["pooled"] = torch.randn(B, 1280)
        batch["time_ids"] = torch.tensor([[8.0 * L, 8.0 * L, 0, 0, 8.0 * L, 8.0 * L]] * 2 * B)
        added = {
            "text_embeds": torch.randn(2 * B, 1280, device=dev, dtype=dtype),
            "time_ids": batch["time_ids"].to(dev),
        }
    x = torch.randn(2 * B, 4, L, L, device=dev, dtype=dtype)
    fwd = unet_forward_flops(
        ref,
        x,
        torch.full((2 * B,), 500, device=dev),
        torch.randn(2 * B, 77, text_dim, device=dev, dtype=dtype),
        added,
    )

    def runner(obj_name: str, m: int | None):
        obj = build_objective(ObjectiveConfig(name=obj_name))
        step = PreferenceStep(obj, sched, "epsilon", ctx, 0)
        ema = emas.get(m)
        ms = [0]

        def one():
            for _ in range(a.grad_accum):
                loss = step(engine, ref, ema, batch, ms[0]).loss.mean()
                engine.backward(loss)
                engine.step()
                ms[0] += 1
            if ema is not None:
                ema.update()

        return one

    def d3po_runner():
        """D3PO's micro-step as the trajectory workload runs it (pipeline/train/trajectories.py): one stored
        DDIM transition of each image of B pairs, scored under classifier-free guidance (one UNet call
        on [uncond; cond], 4 B images) by the policy with a gradient and by the reference without, the
        clamped-ratio loss, backward, step. Synthetic latents; the sd15 sampler's 20 DDIM steps, eta 1."""
        from diffusers import DDIMScheduler

        from pipeline.d3po.ddim import cfg_noise_pred, ddim_step_with_logprob
        from pipeline.losses.d3po import TransitionLogProbs, d3po_terms

        ddim = DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        )
        ddim.set_timesteps(20)
        x_t = torch.randn(2 * B, 4, L, L, device=dev, dtype=dtype)
        x_prev = torch.randn(2 * B, 4, L, L, device=dev, dtype=dtype)
        text = torch.randn(2 * B, 77, text_dim, device=dev, dtype=dtype)
        uncond = torch.randn(1, 77, text_dim, device=dev, dtype=dtype)
        steps = ddim.timesteps  # on the CPU, as the workload keeps them

        def lp(unet, t):
            eps = cfg_noise_pred(unet, x_t, t.to(dev), text, uncond, 5.0)
            return ddim_step_with_logprob(ddim, eps, t, x_t, 1.0, prev_sample=x_prev)[1].view(B, 2)

        def one():
            for i in range(a.grad_accum):
                t = steps[i % len(steps)].repeat(2 * B)

                pol = lp(engine, t)
                with torch.no_grad():
                    ref_lp = lp(ref, t)
                terms = d3po_terms(
                    TransitionLogProbs(pol[:, 0], ref_lp[:, 0], pol[:, 1], ref_lp[:, 1]), 0.1, 0.1
                )
                engine.backward(terms.loss.mean())
                engine.step()

        return one

    results = {}
    # D3PO: policy forward + backward and the reference forward, each on [uncond; cond] (2x the images)
    units = {"dpo": 4, "adaptive_m2": 5, "adaptive_m3": 6, "adaptive_m3_shared": 6, "d3po": 8}
    fns = {
        name: runner(obj, m)
        for name, (obj, m) in {
            "dpo": ("dpo", None),
            "adaptive_m2": ("adaptive_dpo", 2),
            "adaptive_m3": ("adaptive_dpo", 3),
            "adaptive_m3_shared": ("adaptive_dpo", "3_shared"),
        }.items()
        if name in names
    }
    if "d3po" in names:
        if a.shape != "sd15":
            raise UserError("--objectives d3po: the SD1.5 shape only (the online loop trains SD1.5)")
        fns["d3po"] = d3po_runner()
    for fn in fns.values():
        fn()  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # interleaved, one step of each objective per round: slow drifts of the machine hit all alike
    times: dict[str, list[float]] = {name: [] for name in fns}
    ema_of = {"adaptive_m2": 2, "adaptive_m3": 3, "adaptive_m3_shared": "3_shared"}
    gathers0 = {name: emas[ema_of[name]].counts["gathers"] for name in fns if name in ema_of}
    for _ in range(a.steps):
        for name, fn in fns.items():
            times[name] += _timeit(fn, dev, 1)
    for name, ts in times.items():
        t = statistics.median(ts)
        flops = units[name] * fwd * a.grad_accum
        results[name] = {
            "step_s": t,
            "step_s_min": min(ts),
            "pairs_per_s": B * a.grad_accum / t,
            "model_tflop_per_step": flops / 1e12,
            "achieved_tflops": flops / t / 1e12,
            "mfu": (flops / t / 1e12 / a.peak_tflops) if a.peak_tflops else None,
            "peak_mem_gb": _peak_mem(dev),
            "floor_units": units[name],
            "all_s": ts,
        }
    if dev.type == "cuda":  # the peak over every step above: the largest configuration built (M = 3's)
        results["memory"] = {
            "max_allocated_gb": torch.cuda.max_memory_allocated(dev) / 2**30,
            "max_reserved_gb": torch.cuda.max_memory_reserved(dev) / 2**30,
            "device_total_gb": torch.cuda.get_device_properties(dev).total_memory / 2**30,
        }
    for name in gathers0:  # EMA transfers + all-gathers per optimizer step, counted by ShardedEMA
        results[name]["ema_gathers_per_step"] = (
            emas[ema_of[name]].counts["gathers"] - gathers0[name]
        ) / a.steps
    for name in ("adaptive_m2", "adaptive_m3", "adaptive_m3_shared"):
        if name in results and "dpo" in results:
            results[name]["ratio_to_dpo"] = results[name]["step_s"] / results["dpo"]["step_s"]
            results[name]["floor_ratio"] = units[name] / units["dpo"]
    if 3 not in emas or a.skip_breakdown:
        results["peak_tflops"], results["unet_params"], results["unet_fwd_tflop_2B"] = (
            a.peak_tflops,
            n_params(ref),
            fwd / 1e12,
        )
        return results
    bd = breakdown(engine, ref, emas[3], batch, sched, ctx, a.steps)
    results["breakdown_adaptive_m3"] = bd
    # the same ratio from the (steadier) per-phase medians: DPO = inputs + reference + policy fwd/bwd + optimizer;
    # M = 3 adds two EMA forwards (its compute floor) and the EMA bookkeeping (gathers, update)
    dpo_sum = sum(
        bd[k]
        for k in (
            "inputs (noise, targets)",
            "reference forward",
            "policy forward",
            "policy backward",
            "optimizer step",
        )
    )
    m3_sum = dpo_sum + bd["EMA forward"] + bd["EMA gather"] + bd["EMA update"]
    results["phase_sums"] = {
        "dpo_s": dpo_sum,
        "adaptive_m3_s": m3_sum,
        "ratio": m3_sum / dpo_sum,
        "measured_floor_ratio": (dpo_sum + bd["EMA forward"]) / dpo_sum,
        "ema_bookkeeping_share_of_dpo_step": (bd["EMA gather"] + bd["EMA update"]) / dpo_sum,
    }
    # EMA costs, measured alone
    e3 = emas[3]
    results["ema_update_s"] = statistics.median(_timeit(e3.update, dev, a.steps))

    def gather_both():
        e3.invalidate()
        e3.gather(0)
        e3.invalidate()
        e3.gather(1)

    results["ema_gather_s_per_model"] = statistics.median(_timeit(gather_both, dev, a.steps)) / 2
    results["world_size"] = world  # > 1 under torchrun: the gather is an all-gather of the shards
    # the usual way: VAE + text encoder inside the step, from pixels
    if not a.skip_usual and a.shape == "sd15":
        vae = sd15_vae().to(dev, dtype).eval().requires_grad_(False)
        te = clip_l_text().to(dev, dtype).eval().requires_grad_(False)
        pix = torch.randn(2 * B, 3, 8 * L, 8 * L, device=dev, dtype=dtype)
        ids = torch.randint(0, 49408, (B, 77), device=dev)
        dpo = runner("dpo", None)

        def usual():
            with torch.no_grad():
                lat = vae.encode(pix).latent_dist.sample() * 0.18215
                txt = te(ids)[0]
            batch["latents"], batch["text"] = lat.float().cpu(), txt.float().cpu()
            dpo()

        usual()
        t = statistics.median(_timeit(usual, dev, a.steps))
        results["usual_way_dpo"] = {
            "step_s": t,
            "pairs_per_s": B / t,
            "saving_from_precomputed": 1 - results["dpo"]["step_s"] / t,
        }
    results["peak_tflops"] = a.peak_tflops
    results["unet_params"] = n_params(ref)
    results["unet_fwd_tflop_2B"] = fwd / 1e12
    return results


def breakdown(engine, ref, ema, batch, sched, ctx: RunContext, reps: int) -> dict:
    """Median seconds of each phase of an Adaptive-DPO step, timed one phase at a time."""
    dev = ctx.device
    step = PreferenceStep(build_objective(ObjectiveConfig(name="adaptive_dpo")), sched, "epsilon", ctx, 0)
    phases: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def timed(name):
        _sync(dev)
        t = time.perf_counter()
        yield
        _sync(dev)
        phases.setdefault(name, []).append(time.perf_counter() - t)

    for i in range(reps + 1):
        with timed("inputs (noise, targets)"):
            x = step.inputs(batch, 1000 + i)
        with torch.no_grad():
            with timed("reference forward"):
                run_unet(ref, x)
            for k in range(len(ema)):
                ema.invalidate()
                with timed("EMA gather"):
                    m = ema.gather(k)
                with timed("EMA forward"):
                    run_unet(m, x)
        with timed("policy forward"):
            loss = run_unet(engine, x).float().pow(2).mean()
        with timed("policy backward"):
            engine.backward(loss)
        with timed("optimizer step"):
            engine.step()
        with timed("EMA update"):
            ema.update()
        if i == 0:
            phases = {}  # warm-up
    return {
        k: statistics.median(v) * (2 if k.startswith("EMA g") or k.startswith("EMA f") else 1)
        for k, v in phases.items()
    }


def _rss_gb() -> float:
    """This process's resident set size now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS in /proc/self/status")


def _return_freed_heap() -> None:
    """Hand memory freed to glibc's heap back to the kernel (``malloc_trim``), so that RSS counts live data."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakRSS:
    """Samples the resident set size every 5 ms in a thread: the peak of a block of code."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss_gb(), threading.Event()

        def run():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_gb())

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_gb())


def bench_export(a) -> dict:
    """Peak host memory of each rank while the trainer's export (``pipeline.export.export_models``)
    writes the policy and two EMA models (decays 0.9999, 0.5) of an SD1.5-shaped UNet; CPU only."""
    import shutil
    import tempfile

    info = init_distributed("cpu")
    ctx = RunContext(info.rank, info.world, torch.device("cpu"), torch.float32, "sdpa")
    rank, world = ctx.rank, ctx.world
    cfg = TrainConfig(data=TrainData(shards="-"), output=TrainOutput(dir="-"))
    cfg.ema.decays = [0.9999, 0.5]
    factory = _unet_factory(a.width, a.latent)
    built = build_models(cfg, factory, ctx, needs_reference=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    model = tmp / "model"  # the UNet config a real model folder would hold
    factory(torch.float32).save_config(model / "unet")
    _return_freed_heap()  # else the baseline counts freed heap the export then reuses unseen
    barrier()
    before = _rss_gb()
    t = time.perf_counter()
    with _PeakRSS() as peak:
        export_models(
            built.layout,
            built.ema,
            cfg.ema.decays,
            None,
            str(model),
            "StableDiffusionPipeline",
            tmp / "export",
            ctx,
        )
    mine = {
        "rank": rank,
        "rss_before_gb": before,
        "peak_gb": peak.peak,
        "peak_increase_gb": peak.peak - before,
        "seconds": time.perf_counter() - t,
    }
    ranks = all_gather_object(mine)
    shutil.rmtree(tmp, ignore_errors=True)  # each rank's own folder
    return {
        "world_size": world,
        "unet_params": built.n_trainable,
        "model_fp32_gb": built.n_trainable * 4 / 2**30,
        "models_exported": 1 + len(cfg.ema.decays),
        "ranks": ranks,
    }


def bench_memory(a) -> dict:
    """The largest micro-batch whose Adaptive-DPO (M = 3) step fits, for each emulated memory size:
    ``torch.cuda.set_per_process_memory_fraction`` caps this process at GB / device total."""
    if not torch.cuda.is_available():
        raise UserError("bench memory needs a CUDA device (it emulates GPU memory sizes)")
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    out = {"device_total_gb": total, "fits": {}}
    for gb in a.memory_gb:
        best, peak = 0, None
        for mb in (1, 2, 4, 8, 16, 32):  # each size in a fresh process that caps its own memory
            cmd = [sys.executable, "-m", "tools.benchmarks.bench", "step", "--width", str(a.width)]
            cmd += ["--latent", str(a.latent), "--micro-batch", str(mb), "--precision", a.precision]
            cmd += ["--attention", a.attention]
            cmd += ["--steps", "1", "--skip-usual", "--memory-fraction", str(min(1.0, gb / total))]
            cmd += ["--grad-ckpt"] if a.grad_ckpt else []
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                break
            best = mb
            peak = json.loads(p.stdout)["result"]["adaptive_m3"]["peak_mem_gb"]
        out["fits"][f"{gb:g}GB"] = {"max_micro_batch": best, "peak_mem_gb_at_max": peak}
    return out


# ---------------------------------------------------------------------------------------------- encode


def bench_encode(a) -> dict:
    dev = _device(a.device)
    dtype = torch.float32
    torch.manual_seed(0)
    if a.model == "sd15":
        vae, te, R = sd15_vae(), clip_l_text(), a.resolution
    else:
        from transformers import CLIPTextModel  # heavy: only for --model tiny

        vae, te, R = _vae(), CLIPTextModel(_text_config(1000, False)), 64
    vae, te = vae.to(dev, dtype).eval(), te.to(dev, dtype).eval()
    N = a.pairs
    pix = torch.randn(2 * N, 3, R, R, device=dev, dtype=dtype)
    ids = torch.randint(0, te.config.vocab_size, (N, 77), device=dev)

    def enc_images():
        with torch.no_grad():
            return vae.encode(pix).latent_dist.mean * 0.18215

    def enc_text():
        with torch.no_grad():
            return te(ids)[0]

    enc_images(), enc_text()
    t_img = statistics.median(_timeit(enc_images, dev, a.steps))
    t_txt = statistics.median(_timeit(enc_text, dev, a.steps))
    t = t_img + t_txt  # the old layout: one text encode per pair
    mean, txt = enc_images(), enc_text()
    meta = {"caption": "x" * 60, "ranking_id": 1, "text": [0, 0]}
    arrays = {
        "lat_w": mean[0].cpu().numpy().astype(np.float16),
        "lat_l": mean[N].cpu().numpy().astype(np.float16),
    }
    s = encode_sample("0" * 20, arrays, meta)
    payload = sum(len(v) for k, v in s.items() if k != "__key__")
    tar_bytes = sum(512 + -(-len(v) // 512) * 512 for k, v in s.items() if k != "__key__")  # header + padding
    text_bytes = len(npy_bytes(txt[:1].cpu().numpy().astype(np.float16))) - 128  # one row of text-N.npy
    ppc = a.pairs_per_caption
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae.encode(pix[:1])
    vae_flops = fc.get_total_flops()
    peak = a.peak_tflops or measured_peak_tflops(dev, dtype)
    return {
        "model": a.model,
        "resolution": R,
        "peak_tflops": peak,
        "utilisation": (2 * N * vae_flops) / t / 1e12 / peak,
        "pairs_per_call": N,
        "seconds_per_call_one_text_per_pair": t,
        "seconds_per_call_images": t_img,
        "seconds_per_call_text": t_txt,
        "pairs_per_s_one_text_per_pair": N / t,
        "pairs_per_caption": ppc,
        "pairs_per_s_one_text_per_caption": N / (t_img + t_txt / ppc),
        "encode_time_saved": 1 - (t_img + t_txt / ppc) / t,
        "vae_encoder_tflop_per_image": vae_flops / 1e12,
        "achieved_tflops": (2 * N * vae_flops) / t / 1e12,
        "bytes_per_pair_payload": payload,
        "bytes_per_pair_in_tar": tar_bytes,
        "text_bytes_per_caption": text_bytes,
        "bytes_per_pair_with_text": tar_bytes + text_bytes / ppc,
        "vae_params": n_params(vae.encoder) + n_params(vae.quant_conv),
    }


# ---------------------------------------------------------------------------------------------- loader


PICKAPIC_V2_PAIRS = 959_000  # Pick-a-Pic v2: "959k preference data" (the Adaptive-DPO paper)
SHAPES = {"sd15": ((4, 64, 64), (77, 768), None), "sdxl": ((4, 128, 128), (77, 2048), 1280)}


def synthetic_shards(
    out: Path, family: str, pairs: int, shard_size: int = 500, pairs_per_caption: float = 14.3
) -> Path:
    """Shards with the real SD1.5 / SDXL shapes and random float16 content, and their manifest; each
    pair's caption drawn uniformly from ``pairs / pairs_per_caption`` captions, each caption's text
    stored once (shard format v2), as ``stages.encode`` writes them."""
    lat, txt, pooled = SHAPES[family]
    rng = np.random.default_rng(0)
    ranges = shard_ranges(pairs, shard_size)
    n_captions = max(1, int(pairs // pairs_per_caption))
    captions = rng.integers(n_captions, size=pairs)
    texts = plan_texts([int(c).to_bytes(8, "little") for c in captions], ranges)
    write_json_atomic(
        out / "plan.json",
        {
            "format": FORMAT,
            "version": VERSION,
            "resolution": 8 * lat[1],
            "model": {"path": "-", "family": family, "config_hash": "-"},
            "latent_shape": list(lat),
            "text_shape": list(txt),
            "pooled_dim": pooled,
            "dtypes": {"latents": "fp16", "text": "fp16"},
            "store_std": False,
            "n_shards": len(ranges),
            "scan": {"rows_read": pairs, "skipped": {}, "skipped_ids": {}},
        },
    )
    for s, (start, end) in enumerate(ranges):
        n_new = len(texts.first_seen[s])
        text_files = write_texts(
            out,
            s,
            rng.standard_normal((n_new, *txt)).astype(np.float16),
            rng.standard_normal((n_new, pooled)).astype(np.float16) if pooled else None,
        )
        samples = []
        for i in range(start, end):
            arrays = {
                "lat_w": rng.standard_normal(lat).astype(np.float16),
                "lat_l": rng.standard_normal(lat).astype(np.float16),
            }
            meta = {
                "caption": f"caption {captions[i]}",
                "text": list(texts.refs[i]),
                "user_id": i % 97,
                "winner": 0,
                "original_size_w": [1024, 1024],
                "original_size_l": [1024, 1024],
                "crop_top_left_w": [0, 0],
                "crop_top_left_l": [0, 0],
                "extra": {},
            }
            samples.append(encode_sample(f"{i:020d}", arrays, meta))
        record = {
            "index": s,
            "rows": [start, end],
            "skipped": {},
            "skipped_ids": {},
            "text_files": text_files,
        }
        write_shard(out / shard_name(s), samples, record)
    merge_manifest(out)
    return out


def _evict_page_cache(folder: Path) -> None:
    """Drop every file of ``folder`` from the page cache (``posix_fadvise(DONTNEED)``; no root needed,
    the files are clean), so the next read comes from the disk: the loader from cold cache."""
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def bench_loader(a) -> dict:
    import tempfile

    if a.synthetic:
        a.shards = str(
            synthetic_shards(
                Path(tempfile.mkdtemp(prefix="bench_shards_")),
                a.synthetic,
                a.pairs_synthetic,
                pairs_per_caption=a.pairs_per_caption,
            )
        )
    m = load_manifest(a.shards)
    paths = [Path(a.shards) / s["name"] for s in m["shards"]]
    counts = [s["count"] for s in m["shards"]]
    out = {}
    for workers in sorted({0, a.workers}):
        if a.cold:
            _evict_page_cache(Path(a.shards))
        stream = PairStream(paths, counts, m, 0, 1, a.micro_batch, workers, 0, 256)
        it = iter(make_loader(stream, workers, pin_memory=False))
        next(it)
        t = time.perf_counter()
        for _ in range(a.batches):
            next(it)
        dt = time.perf_counter() - t
        out[f"workers_{workers}"] = {"pairs_per_s": a.batches * a.micro_batch / dt, "batches": a.batches}
    # resuming deep into an epoch: time to the first batch
    stream = PairStream(
        paths, counts, m, 0, 1, a.micro_batch, 0, 0, 256, start=stream.layout.steps_per_epoch - 1
    )
    t = time.perf_counter()
    next(iter(make_loader(stream, 0, False)))
    out["resume_last_batch_of_epoch_s"] = time.perf_counter() - t
    out["pairs"] = sum(counts)
    out["bytes_per_pair"] = m["total_bytes"] / max(sum(counts), 1)
    out["captions"] = m["counts"].get("captions")
    out["gb_for_pickapic_v2"] = out["bytes_per_pair"] * PICKAPIC_V2_PAIRS / 1e9
    return out


# ---------------------------------------------------------------------------------------------- main


def bench_em(a) -> dict:
    """em_dpo's per-micro-step EM (numpy, pipeline/losses/noise_model.py) against the evidence kept:
    ``--em-kept`` pairs already observed (6000 annotators), then ``--steps`` observes of ``--pairs``
    pairs (a global micro-batch), timed."""
    rng = np.random.default_rng(0)
    out = {}
    for kept in a.em_kept:
        est = FlipRateEstimator(NoiseConfig(warmup_pairs=0, history=max(kept * 2, 16)))
        est.observe(rng.normal(0, 10, kept), rng.integers(0, 6000, kept))
        times = []
        for _ in range(a.steps):
            z, u = rng.normal(0, 10, a.pairs), rng.integers(0, 6000, a.pairs)
            t = time.perf_counter()
            est.observe(z, u)
            times.append(time.perf_counter() - t)
        out[str(kept)] = {"observe_ms_median": 1e3 * float(np.median(times)), "pairs_per_observe": a.pairs}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["step", "encode", "loader", "memory", "export", "em"])
    p.add_argument(
        "--em-kept", type=int, nargs="+", default=[100_000, 1_000_000], help="em: pairs of evidence kept"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--overlap-gather",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="EMA all-gather of the next model during a forward (ema.overlap_gather)",
    )
    p.add_argument("--steps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (e.g. 125 for V100 fp16 tensor cores)",
    )
    p.add_argument("--skip-usual", action="store_true")
    p.add_argument("--skip-breakdown", action="store_true", help="step: no per-phase timing")
    p.add_argument("--grad-accum", type=int, default=1, help="step: micro-steps per timed optimizer step")
    p.add_argument("--zero-stage", type=int, default=2, choices=[1, 2], help="step: DeepSpeed ZeRO stage")
    p.add_argument("--shape", default="sd15", choices=["sd15", "sdxl"], help="step: the UNet's architecture")
    p.add_argument(
        "--objectives",
        nargs="+",
        default=["dpo", "adaptive_m2", "adaptive_m3"],
        choices=["dpo", "adaptive_m2", "adaptive_m3", "adaptive_m3_shared", "d3po"],
        help="step: which steps to time (each built EMA model stays resident)",
    )
    p.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush subnormals to zero (the 'before' of BENCHMARKS.md)",
    )
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--shards")
    p.add_argument(
        "--synthetic", choices=["sd15", "sdxl"], help="loader: bench on generated shards of these shapes"
    )
    p.add_argument("--pairs-synthetic", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--cold", action="store_true", help="loader: evict the shards from the page cache first")
    p.add_argument(
        "--pairs-per-caption",
        type=float,
        default=14.3,
        help="encode/loader: mean pairs per distinct caption (Pick-a-Pic: over 500k pairs over 35k prompts)",
    )
    p.add_argument(
        "--memory-gb", type=float, nargs="+", default=[16, 32], help="memory: emulated sizes (V100: 16, 32)"
    )
    p.add_argument("--memory-fraction", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not a.keep_denormals:
        flush_denormals()
    fn = {
        "step": bench_step,
        "encode": bench_encode,
        "loader": bench_loader,
        "memory": bench_memory,
        "export": bench_export,
        "em": bench_em,
    }[a.what]
    try:
        result = fn(a)
    except UserError as e:
        print(f"tools.benchmarks.bench: error: {e}", file=sys.stderr)
        return 2
    res = {
        "what": a.what,
        "args": vars(a),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "result": result,
    }
    text = json.dumps(res, indent=1, default=float)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # several ranks (torchrun): rank 0 reports
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
