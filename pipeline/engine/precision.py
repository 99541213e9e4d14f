"""Precision and attention choices, refused early when the machine cannot honour them."""

from __future__ import annotations

import importlib.util
import logging

import torch

from pipeline.errors import UserError
from pipeline.models import DTYPES as COMPUTE_DTYPE  # the configs' one vocabulary: fp32, fp16, bf16

log = logging.getLogger(__name__)


def check_precision(precision: str, device: torch.device, fp16_on_cpu: bool = False) -> torch.dtype:
    """The compute dtype of ``train.precision`` on ``device``. fp16 on the CPU only with
    ``train.fp16_on_cpu`` (tests of the V100 path: DeepSpeed's fp16 engine and dynamic loss scaling)."""
    if precision == "fp16" and device.type == "cpu":
        if not fp16_on_cpu:
            raise UserError(
                "train.precision=fp16 on the CPU: use fp32 or bf16 there (fp16 is for GPUs such as the V100;"
                " train.fp16_on_cpu=true runs it anyway, for tests)"
            )
        allow_fp16_on_the_cpu_accelerator()
    if precision == "bf16" and device.type == "cuda" and not has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(
            f"train.precision=bf16 but {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
            "has no bf16 tensor cores (sm_80 and newer: A100, H100): use fp16"
        )
    return COMPUTE_DTYPE[precision]


def has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: compute capability 8.0 or newer. Not ``torch.cuda.is_bf16_supported()``, which
    counts emulation and says yes on a V100 (sm_70), where xformers' bf16 kernels do not exist."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def allow_fp16_on_the_cpu_accelerator() -> None:
    """DeepSpeed's CPU accelerator calls fp16 supported only where oneDNN has fp16 kernels (CPUs with
    AVX512-FP16 or AMX-FP16), and its engine then refuses ``fp16.enabled``. PyTorch runs the UNet's
    fp16 ops on any CPU, slowly, which is all the tests of the fp16 path need: declare fp16 supported,
    in this process only."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        acc.is_fp16_supported = lambda: True


def enable_tf32(device: torch.device, on: bool = True) -> bool:
    """TF32 tensor cores for fp32 matmuls and convolutions on sm80+ (A100, H100): PyTorch leaves matmuls
    in full fp32 by default. Returns whether it is on."""
    use = on and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    torch.backends.cuda.matmul.allow_tf32 = use
    torch.backends.cudnn.allow_tf32 = use
    return use


def flush_denormals() -> None:
    """Flush subnormal floats to zero on the CPU. Measured here: when a pair's logit reaches ~90 the
    DPO loss's gradient sigmoid(-90) ~ 8e-40 is subnormal in float32, and the whole UNet backward
    then runs on subnormals, 50x slower (27 s instead of 0.5 s per step; BENCHMARKS.md). The values
    flushed are below 1.2e-38; GPUs are not affected either way."""
    torch.set_flush_denormal(True)


def unet_head_dims(config: dict) -> list[int]:
    """The attention head dims of a diffusers UNet config: SD1.5 40/80/160, SDXL 64. diffusers' legacy
    ``attention_head_dim`` holds the number of heads when ``num_attention_heads`` is absent."""
    ch = list(config["block_out_channels"])
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    heads = heads if isinstance(heads, (list, tuple)) else [heads] * len(ch)
    return sorted({c // h for c, h in zip(ch, heads) if h and c % h == 0})


def xformers_probe(device: torch.device, dtype: torch.dtype, head_dims: list[int]) -> str | None:
    """None when xformers runs forward and backward at every head dim in ``dtype`` on ``device``; else
    why not. Importability proves neither a wheel built for this torch nor a kernel for the dtype
    (no bf16 below sm_80) and the head dims."""
    try:
        import xformers.ops as xops

        for d in head_dims or [64]:
            q, k, v = (
                torch.randn(1, 64, 2, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
            )
            out = xops.memory_efficient_attention(q, k, v)
            out.float().sum().backward()
            if not (torch.isfinite(out).all() and torch.isfinite(q.grad).all()):
                return f"non-finite output at head dim {d}"
    except (
        Exception
    ) as e:  # ImportError, NotImplementedError (no kernel), RuntimeError (a wheel for another torch)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def resolve_attention(
    choice: str, device: torch.device, dtype: torch.dtype = torch.float32, head_dims: list[int] | None = None
) -> str:
    """auto -> xformers when it is installed, on CUDA, and passes ``xformers_probe`` for the run's dtype
    and the UNet's head dims; else PyTorch SDPA (with a warning when xformers was there but failed).
    Asking for xformers where it cannot run fails with the reason."""
    have = importlib.util.find_spec("xformers") is not None
    if choice == "xformers":
        if not have:
            raise UserError(
                "model.attention=xformers but xformers is not installed (pip install '.[gpu]'), or use sdpa"
            )
        if device.type != "cuda":
            raise UserError("model.attention=xformers needs a CUDA device; use sdpa on the CPU")
        why = xformers_probe(device, dtype, head_dims or [])
        if why:
            raise UserError(
                f"model.attention=xformers but its probe failed ({why}): use sdpa, or an xformers "
                "wheel built for this torch"
            )
        return "xformers"
    if choice == "auto" and have and device.type == "cuda":
        why = xformers_probe(device, dtype, head_dims or [])
        if why is None:
            return "xformers"
        log.warning("xformers is installed but failed its probe (%s): using PyTorch SDPA", why)
    return "sdpa"


def apply_attention(unet, backend: str) -> None:
    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
