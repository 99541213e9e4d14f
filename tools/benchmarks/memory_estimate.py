"""Per-GPU memory ESTIMATE of each shipped training config, made without a GPU.

    python -m tools.benchmarks.memory_estimate [--world 8] [--out FILE.json] [--configs configs/train/sd15_dpo.yaml ...]
                                    [--quick]   (no what-to-change search, no flipped-checkpointing traces)

One row per ``configs/train/sd15_*.yaml`` and ``sdxl_*.yaml`` (as shipped, gradient checkpointing as
the YAML sets it), and per GPU size whether it fits or what to change first. Figures in GiB (2**30 B).

Method (every number below comes out of this computation):

1. Activations, traced. The UNet (tools/benchmarks/bench_models.py: the public SD1.5 / SDXL shapes) is built on
   PyTorch's meta device through the trainer's own ``pipeline.engine.build.new_unet`` (LoRA adapters
   included), cast to the compute dtype, and its forward + backward run there (no compute, seconds)
   under ``MemoryTracker``, a TorchDispatchMode that adds up the bytes of every new tensor storage an
   op creates and subtracts them when the storage is freed; its maximum is the peak. On meta,
   ``F.scaled_dot_product_attention`` would take the math path and hold the [B, heads, L, L]
   attention matrix; on a GPU the flash / memory-efficient kernels (or xformers) keep O(L). So during
   the trace it is replaced (``flash_attention``) by an autograd Function that allocates what a flash
   kernel does: the output and a float32 log-sum-exp [B, heads, L] (saved with q, k, v, out), and in
   the backward dq, dk, dv plus flash-attn 2's float32 dq accumulator and row sums (transient).
   Parameter gradients are dropped as soon as they are accumulated, as ZeRO-2's hooks copy each into
   its reduce bucket (counted in 2). Traced: the policy's forward + backward at the config's
   micro-batch (2 x ``data.micro_batch`` images for the pair objectives; D3PO: 2 x micro_batch
   transitions x 2 for classifier-free guidance) with the config's gradient checkpointing, and the
   no-grad forwards of the reference (LoRA: the policy with adapters disabled) and of an EMA model.
   Pair objectives run those forwards before the policy's (pipeline/train/pair_step.py): the activation figure is
   the max of the three peaks. D3PO runs the reference forward after the policy's forward, before its
   backward (pipeline/train/trajectories.py): there it is the policy's saved activations plus the
   no-grad forward's peak, or the policy's own peak if larger.
2. States, analytic, per GPU with N ranks (``--world``), P trainable parameters (LoRA: the adapters),
   P_all all UNet parameters, c bytes of ``train.precision``, part = ceil(P / N):
   module in the compute dtype c P_all; fp32 master partition 4 part; Adam moments 8 part; during the
   backward ZeRO-2's reduce buckets (``reduce_bucket_size`` elements of c bytes from
   pipeline/engine/ds_config.py, two with ``overlap_comm``) and the gradient partition c part (two
   with ``train.grad_accum`` > 1); the frozen reference c_ref P_all (none for LoRA); EMA (any
   ``ema.decays`` / ``half_lives``): one reusable module c P_all, a second flat buffer c P with
   ``ema.overlap_gather`` and N > 1 and two or more EMA models (with ``ema.resident``, the default, one
   flat buffer c P per EMA model beyond the first instead), the shards 4 part per EMA model on the
   GPU unless ``ema.offload`` (then in pinned host memory, reported per rank, with a 4 part staging
   buffer). The DeepSpeed 0.19.8 lines behind each term are cited in ``states``.
3. Total = 1.10 x the largest of four phases + 1.0 GiB. The policy's backward: states (the
   persistent ones plus buckets and gradient partition) + its traced forward + backward peak. The
   no-grad forwards: persistent states + the previous micro-steps' gradient sum + the EMA all-gather's
   source (c part) + their traced peak (D3PO: + the policy's saved activations). The optimizer step:
   persistent states + the accumulated 16-bit gradient partition, its flattened copy and its fp32 copy
   (stage_1_and_2.py 3113-3118; no activations, no buckets then). Start-up: the policy in fp32 on the
   GPU before DeepSpeed casts it (4 P_all). The table's "states" are those at the policy's backward,
   its "activations" the larger traced peak.
4. Fit: total <= the memory nvidia-smi reports (V100 16 GB: 16160 MiB, V100 32 GB: 32510, A100 40 GB:
   40536, 80 GB: 81559 = H100's, a little less than A100-80's 81920). Where it does not fit the advice
   tries, cumulatively: gradient checkpointing on, then micro_batch 1 (train.grad_accum multiplied to
   keep the total batch), then LoRA rank 8 (the authors'), and names the first that fits. bf16 configs
   need train.precision=fp16 on a V100 (no bf16 tensor cores; pipeline/engine/precision.py), the same
   bytes.

Assumptions (not traced): a fixed 1.0 GiB for the CUDA context, cuBLAS/cuDNN workspaces and NCCL
buffers; 10 % of the allocator's memory for fragmentation and block rounding; the attention kernel
keeps O(L) memory (flash / memory-efficient SDPA or xformers; never the math path); DeepSpeed's
start-up transients (flattening falls back to the CPU when memory is short) and the data loader's
pinned batches are left out. This is an estimate: ``python -m tools.benchmarks.bench memory`` measures a real
step on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 2**30
MIB = 2**20
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces, NCCL: an assumption, not traced
FRAGMENTATION = 0.10  # allocator fragmentation and rounding on the allocator's share: an assumption
LORA_RANK = 8  # the "what to change" LoRA: the authors' rank (configs/train/sd15_adaptive_dpo_lora.yaml)
# (column, usable MiB as nvidia-smi reports it)
GPUS: tuple[tuple[str, int], ...] = (
    ("V100-16", 16160),
    ("V100-32", 32510),
    ("A100-40", 40536),
    ("A100/H100-80", 81559),
)
BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
REPO = Path(__file__).resolve().parents[2]
PLACEHOLDERS = ["data.shards=x", "output.dir=x"]


# ---------------------------------------------------------------------------------------- the tracker


class MemoryTracker(TorchDispatchMode):
    """Live bytes of the tensor storages created while active, and their peak. A storage counts from
    the op that creates it (an output whose storage none of the op's inputs share: views and in-place
    results are not new) until it is freed. Storages made before (parameters, buffers) never count."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.cur = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        self.cur -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:  # shares its input's storage
            return out
        inputs = None
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(o, torch.Tensor):
                continue
            st = o.untyped_storage()
            key = st._cdata
            if key in self.live:
                continue
            if inputs is None:  # in-place and aliasing results keep an input's storage
                inputs = {
                    a.untyped_storage()._cdata
                    for a in torch.utils._pytree.tree_leaves((args, kwargs))
                    if isinstance(a, torch.Tensor)
                }
            if key in inputs:
                continue
            n = st.nbytes()
            self.live[key] = n
            self.cur += n
            if self.cur > self.peak:
                self.peak = self.cur
            self._refs[key] = weakref.ref(st, lambda _, k=key: self._free(k))
        return out


# ------------------------------------------------------------------------ flash-style attention


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _FlashAttention(torch.autograd.Function):
    """What a flash kernel allocates, without computing: forward the output and a float32 log-sum-exp
    [B, H, L] (saved with q, k, v, out); backward dq, dk, dv, and flash-attn 2's float32 dq accumulator
    [B, H, L, D rounded up to 32] and row sums [B, H, L], freed when the backward returns."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _out, _lse = ctx.saved_tensors
        d = _round_up(q.shape[-1], 32 if q.shape[-1] <= 128 else 64)
        dq_accum = torch.empty(*q.shape[:-1], d, dtype=torch.float32, device=q.device)
        row_sums = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del dq_accum, row_sums
        return dq, dk, dv


def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    if attn_mask is not None:
        raise NotImplementedError("flash_sdpa: an attention mask (the UNets trained here pass none)")
    return _FlashAttention.apply(query, key, value)


@contextlib.contextmanager
def flash_attention():
    """Replace ``torch.nn.functional.scaled_dot_product_attention`` (diffusers' AttnProcessor2_0 calls
    it through the module) by ``flash_sdpa`` for the duration."""
    f = torch.nn.functional
    original = f.scaled_dot_product_attention
    f.scaled_dot_product_attention = flash_sdpa
    try:
        yield
    finally:
        f.scaled_dot_product_attention = original


# ------------------------------------------------------------------------------- traced models


@dataclasses.dataclass(frozen=True)
class Family:
    factory: str  # function of tools.benchmarks.bench_models
    latent: int  # latent side at the training resolution (512 / 1024 px: / 8)
    text_dim: int
    sdxl: bool


FAMILIES = {
    "sd15": Family("sd15_unet", 64, 768, False),
    "sdxl": Family("sdxl_unet", 128, 2048, True),
}


def _quiet() -> None:
    from diffusers.utils import logging as dl

    dl.set_verbosity_error()


@functools.cache
def meta_unet(family: str, precision: str, lora_rank: int, targets: tuple[str, ...]) -> torch.nn.Module:
    """The UNet as the trainer builds it (``new_unet``: LoRA adapters on ``targets``, SDPA attention),
    on the meta device, every parameter in the compute dtype (DeepSpeed casts the module, adapters
    included). Cached: meta modules hold no memory; the traces set train/eval and checkpointing."""
    import tools.benchmarks.bench_models as bm
    from pipeline.engine.build import new_unet
    from pipeline.engine.lora import lora_config
    from pipeline.schema.train import TrainModel

    _quiet()
    dtype = DTYPES[precision]
    lora = lora_config(TrainModel(lora_rank=lora_rank, lora_targets=list(targets)))
    factory = getattr(bm, FAMILIES[family].factory)
    with torch.device("meta"):
        unet = new_unet(lambda dt: factory().to(dt), dtype, lora, "sdpa")
        unet.to(dtype)
    return unet


def param_counts(
    family: str, lora_rank: int, targets: tuple[str, ...], precision: str = "fp16"
) -> tuple[int, int]:
    """(trainable, all) parameters of the UNet (trainable: the LoRA adapters when lora_rank > 0)."""
    unet = meta_unet(family, precision, lora_rank, targets)
    ps = list(unet.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def _inputs(family: str, n: int, dtype: torch.dtype):
    """pipeline.losses.diffusion.UNetInputs of n images on meta (SDXL: pooled text and fp32 size/crop ids)."""
    from pipeline.losses.diffusion import UNetInputs

    f = FAMILIES[family]
    kw = {"device": "meta"}
    added = None
    if f.sdxl:
        added = {
            "text_embeds": torch.empty(n, 1280, dtype=dtype, **kw),
            "time_ids": torch.empty(n, 6, dtype=torch.float32, **kw),
        }
    return UNetInputs(
        sample=torch.empty(n, 4, f.latent, f.latent, dtype=dtype, **kw),
        timesteps=torch.empty(n, dtype=torch.int64, **kw),
        text=torch.empty(n, 77, f.text_dim, dtype=dtype, **kw),
        added=added,
        target=torch.empty(n, 4, f.latent, f.latent, dtype=torch.float32, **kw),
    )


def _traced(precision: str) -> str:
    """The dtype a trace runs in: fp16 for both 16-bit types (the same bytes everywhere; one trace)."""
    return "fp32" if BYTES[precision] == 4 else "fp16"


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


@functools.cache
def trace_policy(
    family: str, precision: str, n: int, checkpointing: bool, lora_rank: int, targets: tuple[str, ...]
) -> dict[str, int]:
    """The policy's forward + backward on n images: bytes live after the forward and the peak."""
    from pipeline.losses.diffusion import run_unet

    unet = meta_unet(family, precision, lora_rank, targets)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    # ZeRO-2 copies each gradient into its reduce bucket as it is accumulated and frees it
    hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in unet.parameters() if p.requires_grad]
    tr = MemoryTracker()
    try:
        with flash_attention(), tr:
            x = _inputs(family, n, DTYPES[precision])
            out = run_unet(unet, x)
            after_forward = tr.cur
            (out.float() - x.target).pow(2).mean().backward()
            del out, x
    finally:
        for h in hooks:
            h.remove()
    return {"after_forward": after_forward, "peak": tr.peak}


@functools.cache
def trace_nograd(
    family: str, precision: str, n: int, lora_rank: int, targets: tuple[str, ...], adapters: bool
) -> int:
    """Peak bytes of a no-grad forward on n images (LoRA with adapters off: the reference)."""
    from pipeline.engine.lora import adapters_disabled
    from pipeline.losses.diffusion import run_unet

    unet = meta_unet(family, precision, lora_rank, targets).eval()
    off = adapters_disabled(unet) if lora_rank and not adapters else contextlib.nullcontext()
    tr = MemoryTracker()
    with flash_attention(), torch.no_grad(), off, tr:
        x = _inputs(family, n, DTYPES[precision])
        run_unet(unet, x)
        del x
    return tr.peak


# ---------------------------------------------------------------------------------- one setting


@dataclasses.dataclass(frozen=True)
class Setting:
    """What memory depends on, read from one resolved TrainConfig."""

    family: str
    precision: str
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    lora_rank: int
    lora_targets: tuple[str, ...]
    reference_precision: str | None  # None: no separate reference module (LoRA, or not needed)
    needs_reference: bool
    needs_losers: bool
    uses_ema: bool
    data_kind: str
    n_ema: int
    ema_offload: bool
    ema_overlap: bool
    ema_resident: bool
    guidance: float
    reduce_bucket: int  # elements (ds_config)
    bucket_buffers: int  # 2 with overlap_comm, else 1

    @property
    def images(self) -> int:
        if self.data_kind == "trajectories":
            return 2 * self.micro_batch * (2 if self.guidance != 1.0 else 1)
        return (2 if self.needs_losers else 1) * self.micro_batch


def sampler_guidance(family: str) -> float:
    """D3PO trains on trajectories sampled with configs/sample/<family>.yaml's guidance (1: no
    unconditional half in the trained UNet call)."""
    import yaml

    path = REPO / "configs" / "sample" / f"{family}.yaml"
    if not path.is_file():
        path = REPO / "configs" / "sample" / "sd15.yaml"
    return float(yaml.safe_load(path.read_text()).get("sampler", {}).get("guidance", 1.0))


def family_of(path: Path) -> str:
    for name in FAMILIES:
        if path.name.startswith(name + "_"):
            return name
    raise ValueError(f"{path}: not an sd15_* or sdxl_* config")


def load_setting(path: Path, overrides: list[str], world: int) -> Setting:
    from pipeline.config import load_config
    from pipeline.engine.ds_config import build_ds_config
    from pipeline.losses.objectives import OBJECTIVES, TRAJECTORY_OBJECTIVES
    from pipeline.schema.train import TrainConfig

    cfg = load_config(TrainConfig, path, PLACEHOLDERS + list(overrides))
    family = family_of(path)
    obj = OBJECTIVES.get(cfg.objective.name) or TRAJECTORY_OBJECTIVES[cfg.objective.name]
    lora = cfg.model.lora_rank > 0
    ref = cfg.model.reference_dtype
    ref_precision = None
    if obj.needs_reference and not lora:
        ref_precision = cfg.train.precision if ref == "auto" else ref
    zero = build_ds_config(cfg, world, on_cuda=True)["zero_optimization"]
    return Setting(
        family=family,
        precision=cfg.train.precision,
        micro_batch=cfg.data.micro_batch,
        grad_accum=cfg.train.grad_accum,
        checkpointing=cfg.model.gradient_checkpointing,
        lora_rank=cfg.model.lora_rank,
        lora_targets=tuple(cfg.model.lora_targets),
        reference_precision=ref_precision,
        needs_reference=obj.needs_reference,
        needs_losers=obj.needs_losers,
        uses_ema=obj.uses_ema,
        data_kind=obj.data_kind,
        n_ema=len(cfg.ema.all_decays),
        ema_offload=cfg.ema.offload,
        ema_overlap=cfg.ema.overlap_gather,
        ema_resident=cfg.ema.resident,
        guidance=sampler_guidance(family) if obj.data_kind == "trajectories" else 1.0,
        reduce_bucket=int(zero["reduce_bucket_size"]),
        bucket_buffers=2 if zero["overlap_comm"] and zero["contiguous_gradients"] else 1,
    )


def activations(s: Setting) -> dict[str, int]:
    """Traced activation bytes of one micro-step (step 1 of the method): the policy's forward +
    backward peak, the bytes its graph holds after the forward, the no-grad forwards' peaks, and
    ``no_grad_phase``: what is live at the no-grad forwards' worst (pair objectives run them before the
    policy's forward, D3PO after it, beside the policy's saved activations)."""
    n, prec = s.images, _traced(s.precision)
    pol = trace_policy(s.family, prec, n, s.checkpointing, s.lora_rank, s.lora_targets)
    out = {"policy_forward_backward": pol["peak"], "policy_after_forward": pol["after_forward"]}
    nograd = []
    if s.needs_reference:
        if s.lora_rank:  # the policy's module with its adapters disabled
            ref = trace_nograd(s.family, prec, n, s.lora_rank, s.lora_targets, False)
        else:
            ref = trace_nograd(s.family, _traced(s.reference_precision), n, 0, (), True)
        out["reference_forward"] = ref
        nograd.append(ref)
    if s.uses_ema and s.n_ema:
        ema = trace_nograd(s.family, prec, n, s.lora_rank, s.lora_targets if s.lora_rank else (), True)
        out["ema_forward"] = ema
        nograd.append(ema)
    worst = max(nograd, default=0)
    out["no_grad_phase"] = worst + (pol["after_forward"] if s.data_kind == "trajectories" else 0)
    out["peak"] = max(pol["peak"], out["no_grad_phase"])
    return out


def states(s: Setting, world: int) -> dict:
    """Analytic per-GPU bytes (step 2 of the method), grouped by when they are live."""
    p, p_all = param_counts(s.family, s.lora_rank, s.lora_targets, _traced(s.precision))
    c = BYTES[s.precision]
    part = math.ceil(p / world)
    persistent = {
        # engine.py 2080-2088: the module's parameters cast to fp16/bf16 and kept on the GPU; ZeRO-2
        # flattens the trainable ones into bit16_groups_flat (stage_1_and_2.py 505-509), the module's
        # parameters become views of it
        "module": c * p_all,
        # stage_1_and_2.py 558-577: single_partition_of_fp32_groups, this rank's fp32 slice
        "fp32_master": 4 * part,
        # Adam's exp_avg and exp_avg_sq of the fp32 partition, created at the first step
        "adam_moments": 8 * part,
    }
    if s.reference_precision is not None:  # build.py build_reference: a second UNet, frozen
        persistent["reference"] = BYTES[s.reference_precision] * p_all
    host = 0
    if s.n_ema:  # build.py build_ema, ema.py ShardedEMA
        # the reusable module in the compute dtype; attach_module binds its trainable parameters into a
        # flat buffer (flat_layout.bind), so the module stays c * P_all
        persistent["ema_module"] = c * p_all
        if s.ema_resident and s.n_ema > 1:  # build_ema: one flat gather buffer per EMA model (ema.resident)
            persistent["ema_resident_buffers"] = c * part * world * (s.n_ema - 1)
        elif s.ema_overlap and world > 1 and s.n_ema > 1:  # ema.py prefetch: a second flat buffer
            persistent["ema_second_buffer"] = c * part * world
        if s.ema_offload:  # pinned host shards + one staging buffer (ShardedEMA.__init__)
            host = 4 * part * (s.n_ema + 1)
        else:
            persistent["ema_shards"] = 4 * part * s.n_ema
    # ds_config sets data_types.grad_accum_dtype fp32 for bf16 only: fp16 gradients stay in the compute
    # dtype (engine.py 1806-1809); bf16 ones are summed in fp32 in the "compact" partition buffer
    # (stage_1_and_2.py 1259-1275)
    g = 4 if s.precision == "bf16" else c
    backward = {
        # stage_1_and_2.py 3257-3278 (setup_buckets, at the first gradient of each
        # backward): a reduce bucket of reduce_bucket_size elements in that dtype (1253-1254), a second
        # one with overlap_comm, released at the end of each backward (_release_ipg_buffers, 924-931);
        # ds_config sizes the bucket at no more than the trainable parameters (LoRA: ~1M, not 5e8)
        "reduce_buckets": s.bucket_buffers * min(s.reduce_bucket, max(p, 1_000_000)) * c,
        # stage_1_and_2.py 2184-2195: grads_in_partition, this rank's gradients (16-bit); with gradient
        # accumulation the previous micro-steps' sum is kept in all_grad_tensors (1038-1045) while the
        # next backward allocates a new one
        "gradient_partition": g * part * (2 if s.grad_accum > 1 else 1),
    }
    no_grad = {
        # the previous micro-steps' gradient sum (all_grad_tensors) during the next micro-step's forwards
        "gradient_partition": g * part if s.grad_accum > 1 else 0,
        # ema.py prefetch: this rank's shard cast to the compute dtype on the GPU, the all-gather's source
        "ema_gather_source": c * part if s.n_ema and s.uses_ema else 0,
    }
    step = {
        # stage_1_and_2.py 3113-3118: at the step the partition's gradients are flattened (a 16-bit
        # copy) and cast to fp32 beside the accumulated partition
        "gradient_partition": c * part,
        "flattened_gradients": c * part,
        "fp32_gradients": 4 * part,
    }
    return {
        "params_trainable": p,
        "params_all": p_all,
        "persistent": persistent,
        "backward": backward,
        "no_grad": no_grad,
        "step": step,
        # build.py build_engine: the policy is built in fp32 and moved to the GPU before DeepSpeed
        # casts it
        "startup": 4 * p_all,
        "host_ema": host,
    }


def estimate(s: Setting, world: int) -> dict:
    """States, activations and the total (step 3 of the method) of one setting."""
    st = states(s, world)
    act = activations(s)
    persistent = sum(st["persistent"].values())
    train_states = persistent + sum(st["backward"].values())
    phases = {  # what is live at the worst moment of each phase of a step
        "policy_backward": train_states + act["policy_forward_backward"],
        "no_grad_forwards": persistent + sum(st["no_grad"].values()) + act["no_grad_phase"],
        "optimizer_step": persistent + sum(st["step"].values()),
        "startup": st["startup"],
    }
    total = (1 + FRAGMENTATION) * max(phases.values()) + CONTEXT_GIB * GIB
    return {
        "setting": dataclasses.asdict(s),
        "images_per_unet_call": s.images,
        "params_trainable": st["params_trainable"],
        "params_all": st["params_all"],
        "states_gib": train_states / GIB,
        "activations_gib": act["peak"] / GIB,
        "total_gib": total / GIB,
        "host_ema_gib": st["host_ema"] / GIB,
        "phases_gib": {k: v / GIB for k, v in phases.items()},
        "states_bytes": {k: st[k] for k in ("persistent", "backward", "no_grad", "step", "startup")},
        "activation_bytes": act,
    }


# ------------------------------------------------------------------------------------ the table


def _changes(s: Setting) -> list[tuple[str, list[str]]]:
    """The cumulative what-to-change steps, in order (each: label, config overrides)."""
    out = []
    if not s.checkpointing:
        out.append(("gradient checkpointing", ["model.gradient_checkpointing=true"]))
    if s.micro_batch > 1:
        ga = s.grad_accum * s.micro_batch
        out.append((f"micro_batch 1 + grad_accum {ga}", ["data.micro_batch=1", f"train.grad_accum={ga}"]))
    if not s.lora_rank:
        out.append((f"LoRA rank {LORA_RANK}", [f"model.lora_rank={LORA_RANK}"]))
    return out


def fit_cell(path: Path, s: Setting, total_gib: float, gpu: str, mib: int, world: int, advise: bool) -> dict:
    """Does the shipped setting fit ``gpu``; if not, the first cumulative change that does."""
    cap = mib * MIB / GIB
    fp16 = gpu.startswith("V100") and s.precision == "bf16"  # refused there; the same bytes in fp16
    labels = ["fp16"] if fp16 else []
    if total_gib <= cap:
        return {"fits": True, "change": labels, "total_gib": total_gib}
    if not advise:
        return {"fits": False, "change": None, "total_gib": None}
    overrides = ["train.precision=fp16"] if fp16 else []
    for label, ov in _changes(s):
        overrides += ov
        labels.append(label)
        t = estimate(load_setting(path, overrides, world), world)["total_gib"]
        if t <= cap:
            return {"fits": False, "change": labels, "total_gib": t}
    return {"fits": False, "change": None, "total_gib": None, "tried": labels}


def _cell(c: dict) -> str:
    if c["fits"]:
        return "yes" + (f" ({', '.join(c['change'])})" if c["change"] else "")
    if c["change"]:
        return f"no → {' + '.join(c['change'])}: {c['total_gib']:.1f}"
    return "no" + (f" (even with {' + '.join(c['tried'])})" if c.get("tried") else "")


def shipped_configs() -> list[Path]:
    d = REPO / "configs" / "train"
    return sorted([*d.glob("sd15_*.yaml"), *d.glob("sdxl_*.yaml")])


def run(paths: list[Path], world: int, quick: bool = False) -> list[dict]:
    """One row per config: the estimate as shipped, with gradient checkpointing flipped (unless
    ``quick``), and per GPU whether it fits or what to change (``quick``: yes / no only)."""
    rows = []
    for path in paths:
        s = load_setting(path, [], world)
        row = {"config": path.name, **estimate(s, world)}
        if not quick:
            flip = f"model.gradient_checkpointing={str(not s.checkpointing).lower()}"
            row["gradient_checkpointing_flipped"] = estimate(load_setting(path, [flip], world), world)
        row["gpus"] = {
            g: fit_cell(path, s, row["total_gib"], g, mib, world, advise=not quick) for g, mib in GPUS
        }
        rows.append(row)
    return rows


def table(rows: list[dict], world: int) -> str:
    head = [
        "config",
        "prec.",
        "UNet images",
        "grad. ckpt",
        "trainable",
        "states",
        "activations",
        "total",
        "host",
        *[g for g, _ in GPUS],
    ]
    lines = [
        f"Per-GPU memory estimate, GiB: ZeRO-2 on {world} GPUs (`python -m tools.benchmarks.memory_estimate --world {world}`)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        s = r["setting"]
        act = f"{r['activations_gib']:.1f}"
        if "gradient_checkpointing_flipped" in r:
            f = r["gradient_checkpointing_flipped"]
            act += f" ({'off' if s['checkpointing'] else 'on'}: {f['activations_gib']:.1f})"
        p = r["params_trainable"]
        cells = [
            r["config"].removesuffix(".yaml"),
            s["precision"],
            str(r["images_per_unet_call"]),
            "on" if s["checkpointing"] else "off",
            f"{p / 1e6:.1f}M" if p < 1e8 else f"{p / 1e9:.2f}B",
            f"{r['states_gib']:.1f}",
            act,
            f"{r['total_gib']:.1f}",
            f"{r['host_ema_gib']:.1f}",
            *[_cell(r["gpus"][g]) for g, _ in GPUS],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    caps = ", ".join(f"{m * MIB / GIB:.1f}" for _, m in GPUS)
    lines += [
        "",
        "UNet images: per UNet call (2 x micro_batch pairs; D3PO x 2 for guidance). states: module, "
        "fp32 master and Adam partitions, reference, EMA, and ZeRO-2's reduce buckets and gradient "
        "partition. activations: traced on the meta device with flash-style attention (in brackets: "
        f"gradient checkpointing flipped). total = {1 + FRAGMENTATION:.2f} x the largest phase of a step + "
        f"{CONTEXT_GIB} GiB (CUDA context). host: pinned fp32 EMA shards per rank, CPU memory. GPU columns: usable memory as "
        f"nvidia-smi reports it ({caps} GiB); fp16: a bf16 config needs "
        "train.precision=fp16 on a V100 (same bytes); 'no → X: t': the first cumulative change "
        "(gradient checkpointing, then micro_batch 1 with grad_accum keeping the batch, then LoRA "
        f"rank {LORA_RANK}) that fits, and its total t.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=8, help="data-parallel ranks (the configs: 8)")
    ap.add_argument("--out", type=Path, default=None, help="write every figure as JSON")
    ap.add_argument(
        "--configs", type=Path, nargs="*", default=None, help="default: configs/train/sd15_*, sdxl_*"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="only the shipped settings: no what-to-change, no flipped checkpointing",
    )
    a = ap.parse_args(argv)
    if a.world < 1:
        ap.error("--world must be >= 1")
    paths = a.configs or shipped_configs()
    rows = run(paths, a.world, a.quick)
    print(table(rows, a.world))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "world": a.world,
            "assumptions": {"context_gib": CONTEXT_GIB, "fragmentation": FRAGMENTATION},
            "gpus_mib": dict(GPUS),
            "rows": rows,
        }
        a.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
