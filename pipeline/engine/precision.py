"""Precision and attention choices, refused early when the machine cannot honour them."""

from __future__ import annotations

import importlib.util

import torch

from pipeline.errors import UserError
from pipeline.models import DTYPES as COMPUTE_DTYPE  # the configs' one vocabulary: fp32, fp16, bf16


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


def flush_denormals() -> None:
    """Flush subnormal floats to zero on the CPU. Measured here: when a pair's logit reaches ~90 the
    DPO loss's gradient sigmoid(-90) ~ 8e-40 is subnormal in float32, and the whole UNet backward
    then runs on subnormals, 50x slower (27 s instead of 0.5 s per step; BENCHMARKS.md). The values
    flushed are below 1.2e-38; GPUs are not affected either way."""
    torch.set_flush_denormal(True)


def resolve_attention(choice: str, device: torch.device) -> str:
    """auto -> xformers when installed and on CUDA, else PyTorch SDPA; asking for xformers without it fails."""
    have = importlib.util.find_spec("xformers") is not None
    if choice == "xformers":
        if not have:
            raise UserError(
                "model.attention=xformers but xformers is not installed (pip install '.[gpu]'), or use sdpa"
            )
        if device.type != "cuda":
            raise UserError("model.attention=xformers needs a CUDA device; use sdpa on the CPU")
        return "xformers"
    if choice == "auto":
        return "xformers" if have and device.type == "cuda" else "sdpa"
    return "sdpa"


def apply_attention(unet, backend: str) -> None:
    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
