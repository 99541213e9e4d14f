"""The training recipe shared by every objective: setup / train / save_checkpoint / export / cleanup,
in the spirit of torchtune's recipes (``stages/train.py`` is its command line).

Setup checks the data, starts the process group, decides the resume (before any model loads) and
builds the models; the loop runs the workload's micro-batches (``pipeline.train.registry``: encoded
pairs, or D3PO trajectories), the optimizer steps, the EMA updates, logging and checkpoints.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import dump_yaml, to_dict, write_resolved
from pipeline.engine import checkpoint as ckpt
from pipeline.engine.build import build_models
from pipeline.engine.context import RunContext
from pipeline.engine.dist import (
    all_reduce_max,
    all_reduce_max_flag,
    check_shared_dir,
    init_distributed,
    resolve_launch,
)
from pipeline.engine.precision import (
    check_precision,
    enable_tf32,
    flush_denormals,
    resolve_attention,
    unet_head_dims,
)
from pipeline.export import export_models
from pipeline.losses.objectives import build_objective
from pipeline.metrics_log import MetricsLogger, PairRecorder
from pipeline.models import load_unet
from pipeline.schema.train import RESUMABLE_KEYS, TrainConfig
from pipeline.train.registry import build_workload
from pipeline.train.stats import StatsAccumulator, engine_scalars, gather_pair_stats_many, summarize
from pipeline.train.workload import Models

log = logging.getLogger("pipeline.train.trainer")


class Trainer:
    """setup / train / save_checkpoint / export / cleanup, in the spirit of torchtune's recipes."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.stop_signal = 0
        self.stop_reason = None
        self._gathers_logged = 0

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        self.objective = build_objective(cfg.objective)
        self.workload = build_workload(cfg, self.objective)  # checks the data before any model loads
        self.info = self.workload.info
        self.out = Path(cfg.output.dir)
        self.ckroot = self.out / "checkpoints"
        # resume: decided before any model loads, so a wrong config fails in seconds; a checkpoint of
        # another world size is converted to DeepSpeed's universal format now, before the process group
        # starts (rank 0 converts, the others wait on a file, not in a collective with a timeout)
        launch = resolve_launch()
        self.resume = ckpt.find_resume(self.ckroot, to_dict(cfg), RESUMABLE_KEYS, TrainConfig)
        universal = self.resume is not None and self.resume.state["world_size"] != launch.world_size
        if universal:
            ckpt.ensure_universal(self.ckroot, self.resume.tag, launch.rank, cfg.dist.universal_wait_min)
        info = init_distributed(cfg.train.device, cfg.dist.timeout_min)
        dtype = check_precision(cfg.train.precision, info.device, cfg.train.fp16_on_cpu)
        flush_denormals()
        enable_tf32(info.device, cfg.train.tf32)
        unet_cfg = json.loads((Path(self.info.path) / "unet" / "config.json").read_text())
        attention = resolve_attention(cfg.model.attention, info.device, dtype, unet_head_dims(unet_cfg))
        self.ctx = RunContext(info.rank, info.world, info.device, dtype, attention)
        check_shared_dir(self.out)  # every rank writes checkpoints there
        self.workload.prepare(self.ctx)
        if self.ctx.rank == 0:
            write_resolved(cfg, self.out / "config.yaml")

        built = build_models(
            cfg,
            lambda dtype: load_unet(self.info.path, dtype),
            self.ctx,
            self.objective.needs_reference,
            load_universal=universal,
        )
        self.engine, self.layout, self.lora = built.engine, built.layout, built.lora
        self.reference, self.ema, self.n_trainable = built.reference, built.ema, built.n_trainable
        self.models = Models(self.engine, self.reference, self.ema)
        self.micro_step = 0
        self.counters = {"nonfinite_skipped": 0, "substituted": 0}
        if self.resume is not None:
            ckpt.restore(self.resume, self.engine, self.ema, self.objective, self.ctx)
            self.counters = dict(self.resume.state["counters"])
            self.micro_step = self.workload.resume_position(self.resume.state)
            if self.ctx.rank == 0:
                log.info("resumed from %s: micro-batch %d", self.resume.folder, self.micro_step)
        resume_step = self.engine.global_steps
        self.logger = (
            MetricsLogger(self.out, resume_step, cfg.output.tensorboard) if self.ctx.rank == 0 else None
        )
        self.recorder = PairRecorder(self.out, self.ctx.rank, resume_step, cfg.output.pair_records)
        # SIGUSR1: SLURM's warning before the end of a job (sbatch --signal=USR1@300): SIGTERM comes only
        # KillWait (30 s by default) before SIGKILL, too little for an SDXL checkpoint
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once
        log.warning(
            "rank %d: got signal %d; checkpointing at the next step (send it again to stop now)",
            self.ctx.rank,
            signum,
        )

    # ------------------------------------------------------------------ train

    def _scalars(self, cat: dict[str, np.ndarray], dt: float, n_steps: int) -> tuple[dict, dict]:
        s, hists = summarize(cat, self.stat_names, self.objective.distributions)
        s.update(self.workload.summary(cat))
        s.update(engine_scalars(self.engine, self.cfg.train.precision, self.ctx.device))
        s.update(
            nonfinite_skipped=self.counters["nonfinite_skipped"],
            substituted=self.counters["substituted"],
            step_time_s=dt / max(n_steps, 1),
            pairs_per_s=self.workload.pairs_per_step(self.ctx.world) * n_steps / max(dt, 1e-9),
            epoch=self.epoch,
        )
        if self.ema is not None:  # EMA models transferred and all-gathered (ema.resident: once per step)
            gathers = self.ema.counts["gathers"]
            s["ema_gathers_per_step"] = (gathers - self._gathers_logged) / max(n_steps, 1)
            self._gathers_logged = gathers
        return s, hists

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
            total=max_steps, initial=e.global_steps, unit="step", disable=self.ctx.rank != 0, desc="train"
        )
        t_log, steps_since_log = time.time(), 0
        rc = 0
        self.objective.begin_step(e.global_steps)  # the restored step after a resume
        pending: list = []  # (step, stats, fields, records) of micro-steps not yet recorded
        while e.global_steps < max_steps:
            batch = next(it)
            if batch["micro_step"] != self.micro_step:
                raise RuntimeError(
                    f"data position {batch['micro_step']} != trainer position {self.micro_step}"
                )
            self.epoch = batch["epoch"]
            self.counters["substituted"] += batch["substituted"]
            out = self.workload.step(self.models, batch, self.micro_step)
            loss = out.loss.mean()
            self.micro_step += 1
            if all_reduce_max_flag(~torch.isfinite(loss)):  # the one host sync of a micro-step
                self.counters["nonfinite_skipped"] += 1
                consecutive_bad += 1
                log.warning(
                    "rank %d: non-finite loss at micro-batch %d: step skipped",
                    self.ctx.rank,
                    self.micro_step - 1,
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
            pending.append((before + 1, stats, fields, self.workload.records(batch)))
            # per-pair statistics go to the host once per optimizer step (one all-gather, one copy);
            # an objective that learns from them (observe) gets them after every micro-step
            if self.objective.stateful or e.global_steps != before:
                self._record(pending, acc)
                pending = []
            if e.global_steps == before:
                continue
            # ---- an optimizer step happened
            # an fp16 overflow skips the step (global_steps still counts it): that is no EMA step
            if self.ema is not None and e.was_step_applied():
                self.ema.update()
            step = e.global_steps
            self.objective.begin_step(step)  # the next one
            steps_since_log += 1
            pbar.update(1)
            if self.ctx.rank == 0 and (step % cfg.train.log_every == 0 or step == max_steps):
                scalars, hists = self._scalars(acc.pop(), time.time() - t_log, steps_since_log)
                self.logger.log(step, scalars, hists)
                pbar.set_postfix(
                    loss=f"{scalars['loss']:.4f}",
                    acc=f"{scalars.get('accuracy', float('nan')):.2f}",
                    pairs_s=f"{scalars['pairs_per_s']:.1f}",
                )
                t_log, steps_since_log = time.time(), 0
            signalled = all_reduce_max(float(self.stop_signal))
            if signalled or step % cfg.checkpoint.every == 0 or step == max_steps:
                self.save_checkpoint()
            self.on_step_end(step)
            if signalled:
                self.stop_reason = f"signal {int(signalled)}"
                rc = 128 + int(signalled)
                break
        pbar.close()
        if pending:  # stopped within an optimizer step (train.max_nonfinite)
            self._record(pending, acc)
        if rc == 1:
            self.save_checkpoint()
        return rc

    def _record(self, pending: list, acc: StatsAccumulator) -> None:
        """Every rank's per-pair values of the pending micro-steps, in order: to the objective's
        ``observe`` (every rank), the log's accumulator (rank 0) and this rank's pair records."""
        gathered = gather_pair_stats_many(
            [(st, f) for _, st, f, _ in pending], self.ctx.device, self.ctx.world
        )
        for (step, stats, _, records), g in zip(pending, gathered):
            self.objective.observe(g)  # the same values on every rank
            if self.ctx.rank == 0:
                acc.add(g)
            b = len(records["key"])
            mine = slice(self.ctx.rank * b, (self.ctx.rank + 1) * b)
            self.recorder.add(step, records, {k: g[k][mine] for k in stats})  # the step it counts for

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self) -> Path:
        step = self.engine.global_steps
        self.recorder.flush(step)
        state = {
            "step": step,
            "micro_step": self.micro_step,
            "world_size": self.ctx.world,
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
            self.ctx,
            self.objective.state_dict(),
        )

    def export(self) -> Path:
        """The policy and every EMA model as loadable folders under ``<output.dir>/export``."""
        return export_models(
            self.layout,
            self.ema,
            self.cfg.ema.all_decays,
            self.lora,
            self.info.path,
            self.info.family.pipeline_class,
            self.out / "export",
            self.ctx,
        )

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
