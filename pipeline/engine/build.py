"""Build the models of a training run: the DeepSpeed ZeRO-2 engine over the policy UNet (full or
LoRA), the frozen reference, and the rank-sharded EMA models. ``stages.train`` and ``tools.bench``
both build through these functions, from a *UNet factory*: ``factory(dtype)`` returns a fresh UNet
with the starting weights in that dtype (the trainer loads the model folder; the benchmark builds a
randomly initialised SD1.5-shaped UNet)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.engine.context import RunContext
from pipeline.engine.ds_config import build_ds_config
from pipeline.engine.ema import ShardedEMA
from pipeline.engine.flat_layout import FlatLayout
from pipeline.engine.lora import LoraReference, lora_config
from pipeline.engine.precision import apply_attention
from pipeline.models import DTYPES
from pipeline.schema.train import TrainConfig

UNetFactory = Callable[[torch.dtype], torch.nn.Module]


def new_unet(factory: UNetFactory, dtype: torch.dtype, lora, attention: str) -> torch.nn.Module:
    """A fresh UNet; with ``lora`` the base is frozen and the adapters are the trainable parameters."""
    unet = factory(dtype)
    if lora is not None:
        unet.requires_grad_(False)
        unet.add_adapter(lora)
    apply_attention(unet, attention)
    return unet


@dataclass
class Built:
    engine: object  # deepspeed.DeepSpeedEngine: the policy
    layout: FlatLayout
    reference: Callable | None
    ema: ShardedEMA | None
    lora: object | None  # peft LoraConfig
    n_trainable: int


def build_engine(cfg: TrainConfig, factory: UNetFactory, lora, ctx: RunContext, load_universal: bool = False):
    """The policy in fp32 (ZeRO-2 keeps the fp32 masters; compute is in ``train.precision``) inside a
    DeepSpeed engine. Returns (engine, number of trainable parameters)."""
    import deepspeed  # heavy (its ops and accelerator probe): loaded when an engine is built

    torch.manual_seed(cfg.train.seed)  # the same LoRA initialisation on every rank
    unet = new_unet(factory, torch.float32, lora, ctx.attention)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(ctx.device)
    params = [p for p in unet.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    ds_cfg = build_ds_config(
        cfg, ctx.world, ctx.device.type == "cuda", load_universal=load_universal, n_trainable=n
    )
    engine, _, _, _ = deepspeed.initialize(model=unet, model_parameters=params, config=ds_cfg)
    return engine, n


def build_reference(cfg: TrainConfig, factory: UNetFactory, engine, ctx: RunContext):
    """The frozen starting UNet in ``model.reference_dtype`` (auto: the compute dtype); for LoRA the
    policy's own module with its adapters disabled (no second copy)."""
    if cfg.model.lora_rank:
        return LoraReference(engine.module)
    rd = ctx.dtype if cfg.model.reference_dtype == "auto" else DTYPES[cfg.model.reference_dtype]
    ref = factory(rd)
    apply_attention(ref, ctx.attention)
    return ref.to(ctx.device).eval().requires_grad_(False)


def build_ema(
    cfg: TrainConfig, factory: UNetFactory, layout: FlatLayout, lora, ctx: RunContext, decays: list[float]
) -> ShardedEMA | None:
    """EMA models of ``decays`` as fp32 rank shards, with one reusable module for their forwards."""
    if not decays:
        return None
    dtype = ctx.dtype
    ema = ShardedEMA(layout, decays, cfg.ema.offload, ctx.device, background=cfg.ema.background_update)
    # loaded in the compute dtype at once (an fp32 SDXL UNet is 10 GiB of host memory per rank): its
    # trainable parameters are overwritten by the gathered shards anyway; frozen ones round the same way
    module = new_unet(factory, dtype, lora, ctx.attention)
    if dtype != torch.float32:
        module.to(dtype)  # LoRA adapters are created in fp32
    # resident: one buffer per model, gathered once per optimizer step; otherwise one shared buffer, and a
    # second pays only where the gather is a collective that can overlap a forward
    if cfg.ema.resident:
        buffers = len(decays)
    else:
        buffers = 2 if cfg.ema.overlap_gather and layout.world > 1 else 1
    ema.attach_module(module.to(ctx.device), dtype, buffers=buffers)
    return ema


def build_models(
    cfg: TrainConfig,
    factory: UNetFactory,
    ctx: RunContext,
    needs_reference: bool,
    load_universal: bool = False,
) -> Built:
    lora = lora_config(cfg.model)
    engine, n = build_engine(cfg, factory, lora, ctx, load_universal)
    layout = FlatLayout(engine)
    ref = build_reference(cfg, factory, engine, ctx) if needs_reference else None
    ema = build_ema(cfg, factory, layout, lora, ctx, cfg.ema.all_decays)
    return Built(engine, layout, ref, ema, lora, n)
