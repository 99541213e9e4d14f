"""The DeepSpeed config, built by one tested function from the typed train config."""

from __future__ import annotations

from pipeline.schema.train import TrainConfig


def build_ds_config(
    cfg: TrainConfig,
    world_size: int,
    on_cuda: bool,
    load_universal: bool = False,
    n_trainable: int | None = None,
) -> dict:
    """ZeRO stage 2 (``train.zero_stage``: 1); total batch = micro_batch x grad_accum x world_size (in pairs).

    Precision: fp16 with dynamic loss scaling (V100; the scaler's settings: ``train.loss_scale``), bf16,
    or fp32. Optimizer: AdamW, torch's fused kernel on CUDA and CPU (no build); DeepSpeed's FusedAdam
    only with ``optim.impl=fused`` (JIT-built on first use: every fresh node needs a matching nvcc and
    ninja, and a killed build leaves a lock that hangs later starts).
    Schedule: linear warm-up to ``optim.lr`` over ``optim.warmup_steps``, then constant.
    """
    o, ls = cfg.optim, cfg.train.loss_scale
    fused = o.impl == "fused"  # DeepSpeed's FusedAdam
    # ZeRO-2 allocates its reduce buckets at this size whatever trains (two with overlap_comm): 5e8
    # elements are 1.86 GiB of fp16 per GPU, for a LoRA run's ~1M parameters too. No larger than the
    # trainable parameters (tools/memory_estimate.py)
    bucket = int(min(5e8, max(n_trainable or 5e8, 1_000_000)))
    ds: dict = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.micro_batch * cfg.train.grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {
            "stage": cfg.train.zero_stage,
            "overlap_comm": on_cuda,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "allgather_bucket_size": bucket,
            "reduce_bucket_size": bucket,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": not fused,
                # torch's own fused AdamW kernel (CPU and CUDA): 5.7x faster than the default
                # foreach path on a flat 56M-parameter partition on this CPU (BENCHMARKS.md)
                **({} if fused else {"fused": True}),
            },
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0 if o.warmup_steps > 0 else o.lr,  # WarmupLR starts at min_lr
                "warmup_max_lr": o.lr,
                "warmup_num_steps": max(o.warmup_steps, 1),
                "warmup_type": "linear",
            },
        },
        "fp16": {
            "enabled": cfg.train.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": ls.initial_power,
            "loss_scale_window": ls.window,
            "hysteresis": ls.hysteresis,
            "min_loss_scale": ls.min_scale,
        },
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        # bf16 has 8 bits of mantissa: a sum of 16 micro-steps' gradients over 64 ranks in bf16 loses
        # the small ones. fp32 accumulation (+2 bytes per gradient element this rank holds)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if cfg.train.precision == "bf16" else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds
