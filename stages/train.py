"""Stage train: Diffusion-DPO / Adaptive-DPO / baselines on encoded shards, DeepSpeed ZeRO-2.

    deepspeed --hostfile hosts --num_gpus 8 stages/train.py --config configs/train/sd15_adaptive_dpo.yaml \
        data.shards=/shards/sd15 output.dir=/runs/a1
    python -m stages.train --config ... (one process: CPU or one GPU)

Kill it at any moment and start it again with the same command: it resumes from the latest complete
checkpoint, exactly (also on another number of GPUs, through DeepSpeed's universal checkpoint).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed stages/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import yaml
from tqdm import tqdm

from pipeline import cli
from pipeline.config import dump_yaml, to_dict, write_resolved
from pipeline.engine import checkpoint as ckpt
from pipeline.engine.dist import all_reduce_max, barrier, init_distributed
from pipeline.engine.ds_config import build_ds_config
from pipeline.engine.ema import ShardedEMA
from pipeline.engine.flat_layout import FlatLayout
from pipeline.engine.precision import apply_attention, check_precision, flush_denormals, resolve_attention
from pipeline.errors import UserError
from pipeline.losses.objectives import build_objective
from pipeline.metrics_log import MetricsLogger, PairRecorder
from pipeline.models import DTYPES, load_unet, pick_device
from pipeline.schema.train import RESUMABLE_KEYS, TrainConfig
from pipeline.step import LoraReference
from pipeline.train.stats import StatsAccumulator, gather_pair_stats, summarize
from pipeline.train.workload import Models, RunContext, build_workload

log = logging.getLogger("stages.train")


class Trainer:
    """setup / train / save_checkpoint / export / cleanup, in the spirit of torchtune's recipes."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.stop_signal = 0
        self.stop_reason = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        self.objective = build_objective(cfg.objective)
        self.workload = build_workload(cfg, self.objective)  # checks the data before any model loads
        self.info = self.workload.info
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        self.device = pick_device(cfg.train.device, local_rank)
        self.dtype = check_precision(cfg.train.precision, self.device)
        flush_denormals()
        self.attention = resolve_attention(cfg.model.attention, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.rank, self.world, _ = init_distributed("nccl" if self.device.type == "cuda" else "gloo")
        self.out = Path(cfg.output.dir)
        self.ckroot = self.out / "checkpoints"

        # resume: decided before any model loads, so a wrong config fails in seconds
        self.tag = ckpt.latest_tag(self.ckroot)
        self.resume_state = None
        if self.tag:
            self.resume_state = ckpt.read_state(self.ckroot, self.tag)
            saved = yaml.safe_load((self.ckroot / self.tag / "config.yaml").read_text())
            diffs = ckpt.config_differences(saved, to_dict(cfg), RESUMABLE_KEYS)
            if diffs:
                raise UserError(
                    f"{self.ckroot / self.tag} was written by another config; refusing to resume "
                    "(use a new output.dir, or restore these keys):\n  " + "\n  ".join(diffs)
                )
        if self.rank == 0:
            write_resolved(cfg, self.out / "config.yaml")

        self.workload.prepare(RunContext(self.rank, self.world, self.device, self.dtype))
        self._build_engine()
        self._build_reference_and_ema()
        self.models = Models(self.engine, self.reference, self.ema)
        self.micro_step = 0
        self.counters = {"nonfinite_skipped": 0, "substituted": 0}
        if self.tag:
            self._load_checkpoint()
        resume_step = self.engine.global_steps
        self.logger = MetricsLogger(self.out, resume_step, cfg.output.tensorboard) if self.rank == 0 else None
        self.recorder = PairRecorder(self.out, self.rank, resume_step, cfg.output.pair_records)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _new_unet(self, dtype: torch.dtype):
        unet = load_unet(self.info.path, dtype)
        if self.cfg.model.lora_rank:
            unet.requires_grad_(False)
            unet.add_adapter(self.lora_config)
        apply_attention(unet, self.attention)
        return unet

    def _build_engine(self) -> None:
        import deepspeed
        from peft import LoraConfig

        m = self.cfg.model
        self.lora_config = None
        if m.lora_rank:
            self.lora_config = LoraConfig(
                r=m.lora_rank,
                lora_alpha=m.lora_alpha or m.lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(m.lora_targets),
            )
        torch.manual_seed(self.cfg.train.seed)  # the same LoRA initialisation on every rank
        unet = self._new_unet(torch.float32)
        if m.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if m.channels_last:
            unet.to(memory_format=torch.channels_last)
        unet.to(self.device)
        resume_universal = bool(self.tag) and self.resume_state["world_size"] != self.world
        ds_cfg = build_ds_config(
            self.cfg, self.world, self.device.type == "cuda", load_universal=resume_universal
        )
        params = [p for p in unet.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=unet, model_parameters=params, config=ds_cfg)
        self.layout = FlatLayout(self.engine)
        self.n_trainable = sum(p.numel() for p in params)

    def _build_reference_and_ema(self) -> None:
        cfg = self.cfg
        if not self.objective.needs_reference:
            self.reference = None
        elif cfg.model.lora_rank:
            self.reference = LoraReference(self.engine.module)
        else:
            rd = self.dtype if cfg.model.reference_dtype == "auto" else DTYPES[cfg.model.reference_dtype]
            ref = load_unet(self.info.path, rd)
            apply_attention(ref, self.attention)
            if cfg.model.channels_last:
                ref.to(memory_format=torch.channels_last)
            self.reference = ref.to(self.device).eval().requires_grad_(False)
        self.ema = None
        if cfg.ema.all_decays:
            self.ema = ShardedEMA(self.layout, cfg.ema.all_decays, cfg.ema.offload, self.device)
            module = self._new_unet(torch.float32)
            if self.dtype != torch.float32:
                module.to(self.dtype)
            if cfg.model.channels_last:
                module.to(memory_format=torch.channels_last)
            # a second buffer pays only where the gather is a collective that can overlap a forward
            buffers = 2 if cfg.ema.overlap_gather and self.world > 1 else 1
            self.ema.attach_module(module.to(self.device), self.dtype, buffers=buffers)

    def _load_checkpoint(self) -> None:
        st = self.resume_state
        if st["world_size"] != self.world:
            load_dir = ckpt.ensure_universal(self.ckroot, self.tag, self.rank)
        else:
            load_dir = self.ckroot
        path, _ = self.engine.load_checkpoint(str(load_dir), tag=self.tag)
        if path is None:
            raise UserError(f"DeepSpeed could not load {load_dir / self.tag}")
        if self.engine.global_steps != st["step"]:
            raise RuntimeError(
                f"checkpoint step {st['step']} but the engine restored {self.engine.global_steps}"
            )
        if self.ema is not None:
            self.ema.load(self.ckroot / self.tag / "ema")
        ckpt.load_rng(self.ckroot / self.tag / "rng", self.rank)
        self.objective.load_state_dict(ckpt.load_objective_state(self.ckroot / self.tag))
        self.counters = dict(st["counters"])
        self.micro_step = self.workload.resume_position(st)
        if self.rank == 0:
            log.info("resumed from %s: step %d, micro-batch %d", self.tag, st["step"], self.micro_step)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once
        log.warning(
            "rank %d: got signal %d; checkpointing at the next step (send it again to stop now)",
            self.rank,
            signum,
        )

    # ------------------------------------------------------------------ train

    def _scalars(self, cat: dict[str, np.ndarray], dt: float, n_steps: int) -> tuple[dict, dict]:
        s, hists = summarize(cat, self.stat_names, self.objective.distributions)
        s.update(self.workload.summary(cat))
        e = self.engine
        s.update(
            lr=float(e.get_lr()[0]),
            loss_scale=float(
                getattr(e.optimizer, "loss_scale", 1.0) if self.cfg.train.precision == "fp16" else 1.0
            ),
            skipped_steps=int(e.skipped_steps),
            nonfinite_skipped=self.counters["nonfinite_skipped"],
            substituted=self.counters["substituted"],
            step_time_s=dt / max(n_steps, 1),
            pairs_per_s=self.workload.pairs_per_step(self.world) * n_steps / max(dt, 1e-9),
            peak_mem_gb=self._peak_mem(),
            epoch=self.epoch,
        )
        return s, hists

    def _peak_mem(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def on_step_end(self, step: int) -> None:
        """Hook after each optimizer step (tests use it to kill the run at a chosen step)."""

    def train(self) -> int:
        cfg, e = self.cfg, self.engine
        max_steps = cfg.train.max_steps
        self.epoch = 0
        acc = StatsAccumulator()
        consecutive_bad = 0
        it = self.workload.batches(self.micro_step)
        pbar = tqdm(
            total=max_steps, initial=e.global_steps, unit="step", disable=self.rank != 0, desc="train"
        )
        t_log, steps_since_log = time.time(), 0
        rc = 0
        while e.global_steps < max_steps:
            batch = next(it)
            if batch["micro_step"] != self.micro_step:
                raise RuntimeError(
                    f"data position {batch['micro_step']} != trainer position {self.micro_step}"
                )
            self.epoch = batch["epoch"]
            self.counters["substituted"] += batch["substituted"]
            active = e.global_steps >= cfg.objective.adaptive.warmup_steps
            out = self.workload.step(self.models, batch, self.micro_step, active)
            loss = out.loss.mean()
            self.micro_step += 1
            if all_reduce_max(0.0 if torch.isfinite(loss).item() else 1.0, self.device) > 0:
                self.counters["nonfinite_skipped"] += 1
                consecutive_bad += 1
                log.warning(
                    "rank %d: non-finite loss at micro-batch %d: step skipped", self.rank, self.micro_step - 1
                )
                if consecutive_bad >= cfg.train.max_nonfinite:
                    self.stop_reason = (
                        f"{consecutive_bad} consecutive non-finite losses (train.max_nonfinite)"
                    )
                    rc = 1
                    break
                continue
            consecutive_bad = 0
            e.backward(loss)
            before = e.global_steps
            e.step()
            stats = out.stats | {"loss": out.loss.detach()}
            self.stat_names = list(stats)
            fields = {k: batch[k] for k in self.workload.pair_fields}
            gathered = gather_pair_stats(stats, fields, self.device, self.world)
            self.objective.observe(gathered)  # the same values on every rank
            if self.rank == 0:
                acc.add(gathered)
            self.recorder.add(before + 1, self.workload.records(batch), stats)  # the step it counts for
            if e.global_steps == before:
                continue
            # ---- an optimizer step happened
            if self.ema is not None:
                self.ema.update()
            step = e.global_steps
            steps_since_log += 1
            pbar.update(1)
            if self.rank == 0 and (step % cfg.train.log_every == 0 or step == max_steps):
                scalars, hists = self._scalars(acc.pop(), time.time() - t_log, steps_since_log)
                self.logger.log(step, scalars, hists)
                pbar.set_postfix(
                    loss=f"{scalars['loss']:.4f}",
                    acc=f"{scalars.get('accuracy', float('nan')):.2f}",
                    pairs_s=f"{scalars['pairs_per_s']:.1f}",
                )
                t_log, steps_since_log = time.time(), 0
            signalled = all_reduce_max(float(self.stop_signal), self.device)
            if signalled or step % cfg.checkpoint.every == 0 or step == max_steps:
                self.save_checkpoint()
            self.on_step_end(step)
            if signalled:
                self.stop_reason = f"signal {int(signalled)}"
                rc = 128 + int(signalled)
                break
        pbar.close()
        if rc == 1:
            self.save_checkpoint()
        return rc

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self) -> Path:
        step = self.engine.global_steps
        self.recorder.flush(step)
        state = {
            "step": step,
            "micro_step": self.micro_step,
            "world_size": self.world,
            "data": self.workload.data_state(),
            "counters": self.counters,
            "time": time.time(),
        }
        return ckpt.save_checkpoint(
            self.engine,
            self.ema,
            self.ckroot,
            step,
            state,
            dump_yaml(self.cfg),
            self.cfg.checkpoint.keep,
            self.rank,
            self.objective.state_dict(),
        )

    def export(self) -> Path:
        """The policy and every EMA model as loadable folders under ``<output.dir>/export``."""
        from pipeline.export import export_full_unet, export_lora

        out = self.out / "export"
        models = [("unet", self.layout.new_flats(torch.float32, self.device))]
        self.layout.gather_into(self.layout.local_partitions(), models[0][1])
        models[0] = ("unet", [f.cpu() for f in models[0][1]])
        for k, d in enumerate(self.cfg.ema.all_decays):
            models.append((f"unet_ema_{d:g}", self.ema.full(k)))
        if self.rank == 0:
            for name, flats in models:
                state = {n: t.clone() for n, t in self.layout.state_dict(flats).items()}
                if self.cfg.model.lora_rank:
                    export_lora(
                        state,
                        self.info.path,
                        self.lora_config,
                        self.info.family.pipeline_class,
                        out / name.replace("unet", "lora"),
                    )
                else:
                    export_full_unet(state, self.info.path, out / name)
        barrier()
        return out

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()


def main(cfg: TrainConfig) -> int:
    t = Trainer(cfg)
    t.setup()
    start = t.engine.global_steps
    if t.rank == 0:
        tb = t.workload.pairs_per_step(t.world)
        log.info(
            "training %s (%s, %s trainable parameters) with %s on %d rank(s), total batch %d pairs, %s, attention %s",
            t.info.family.name, f"LoRA r={cfg.model.lora_rank}" if cfg.model.lora_rank else "full",
            f"{t.n_trainable:,}", cfg.objective.name, t.world, tb, cfg.train.precision, t.attention,
        )  # fmt: skip
    rc = t.train()
    if rc == 0 and cfg.checkpoint.export:
        out = t.export()
        if t.rank == 0:
            print(f"exported to {out}")
    if t.rank == 0:
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
