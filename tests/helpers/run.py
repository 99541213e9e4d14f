"""Run a stage in fresh processes, as a user would: python -m, torchrun or the deepspeed launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.engine.dist import free_port

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CFG = "configs/train/tiny_dpo.yaml"
# the tests' budget, smaller than the toy study's in tiny_base.yaml; a test's own overrides come after
TEST_DEFAULTS = ("data.micro_batch=4", "train.max_steps=20", "checkpoint.every=10")


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def train(
    shards,
    out,
    *overrides,
    nproc: int = 1,
    launcher: str = "torchrun",
    module: str = "stages.train",
    extra_env: dict | None = None,
    timeout: int = 900,
    config: str = TRAIN_CFG,
) -> subprocess.CompletedProcess:
    args = ["--config", config, f"data.shards={shards}", f"output.dir={out}", *TEST_DEFAULTS, *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    elif launcher == "deepspeed":
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            "stages/train.py",
            *args,
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            module,
            *args,
        ]
    return subprocess.run(
        cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout
    )


def check(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, (
        f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-6000:]}"
    )
    return p
