"""Stage train: Diffusion-DPO / Adaptive-DPO / baselines on encoded shards, DeepSpeed ZeRO-2.

    deepspeed --hostfile hosts --num_gpus 8 stages/train.py --config configs/train/sd15_adaptive_dpo.yaml \
        data.shards=/shards/sd15 output.dir=/runs/a1
    python -m stages.train --config ... (one process: CPU or one GPU)

Kill it at any moment and start it again with the same command: it resumes from the latest complete
checkpoint, exactly (also on another number of GPUs, through DeepSpeed's universal checkpoint).

The recipe: setup (data checks, distributed, resume decision, models), train (the loop over the
workload's micro-batches), checkpoint, export. The data and the step come from a workload chosen by
the objective (``pipeline.train.workload``, ``pipeline.train.registry``); everything else is library
code in ``pipeline/``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed stages/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli
from pipeline.schema.train import TrainConfig
from pipeline.train.trainer import Trainer

log = logging.getLogger("stages.train")


def main(cfg: TrainConfig) -> int:
    t = Trainer(cfg)
    t.setup()
    start = t.engine.global_steps
    if t.ctx.rank == 0:
        log.info(
            "training %s (%s, %s trainable parameters) with %s on %d rank(s), total batch %d pairs, %s, attention %s",
            t.info.family.name,
            f"LoRA r={cfg.model.lora_rank}" if cfg.model.lora_rank else "full",
            f"{t.n_trainable:,}",
            cfg.objective.name,
            t.ctx.world,
            t.workload.pairs_per_step(t.ctx.world),
            cfg.train.precision,
            t.ctx.attention,
        )
    rc = t.train()
    if rc == 0 and cfg.checkpoint.export:
        out = t.export()
        if t.ctx.rank == 0:
            print(f"exported to {out}")
    if t.ctx.rank == 0:
        if t.stop_reason:
            print(
                f"stopped at step {t.engine.global_steps}: {t.stop_reason}; checkpoint in {t.ckroot}",
                file=sys.stderr,
            )
        else:
            print(
                f"trained steps {start}..{t.engine.global_steps} -> {t.out} (metrics.jsonl, checkpoints/, export/)"
            )
    t.cleanup()
    return rc


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run("stages.train", TrainConfig, main, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli_main())
