"""Atomic, resumable checkpoints: a checkpoint is complete or absent, ``latest`` moves only after it is.

Layout under ``<output.dir>/checkpoints/``:

    step_00001000/                 one complete checkpoint
        <DeepSpeed engine files>   module, ZeRO-2 optimizer partitions, lr scheduler, loss scaler
        ema/rank_00000.safetensors EMA shards of each rank (pipeline.engine.ema)
        rng/rank_00000.safetensors torch CPU/CUDA RNG states of each rank
        objective.safetensors      a stateful objective's state (identical on every rank; rank 0's)
        trainer_state.json         step, micro-step and the workload's data state, counters
        config.yaml                the resolved config of the run
    latest                         name of the newest complete checkpoint
    universal/step_00001000/       made on demand when the world size changed (ds_to_universal)

Everything is written under ``.tmp-step_N`` and renamed by rank 0 after every rank finished.
Our own files are safetensors/JSON/YAML; DeepSpeed's engine files are torch pickles, which every
loader here (resume, the universal conversion, ``load_checkpoint_unet``) reads inside
``pipeline.engine.safe_load.restricted_torch_load``: tensors and DeepSpeed's few state classes only,
anything else is refused before it can run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.config import flatten, schema_default
from pipeline.engine import dist
from pipeline.engine.context import RunContext
from pipeline.engine.dist import barrier
from pipeline.engine.lora import lora_config
from pipeline.engine.safe_load import REFUSED_PREFIX, restricted_torch_load
from pipeline.errors import UserError
from pipeline.models import load_unet
from pipeline.schema.train import TrainModel

log = logging.getLogger(__name__)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(root: Path) -> str | None:
    f = root / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not (root / tag / "trainer_state.json").is_file():
        raise UserError(f"{f} names {tag}, which is not a complete checkpoint; remove {f} to start over")
    return tag


def read_state(root: Path, tag: str) -> dict:
    return json.loads((root / tag / "trainer_state.json").read_text())


def config_differences(
    saved: dict, current: dict, allowed: tuple[str, ...], schema: type | None = None
) -> list[str]:
    """Keys whose values differ, but for the ``allowed`` ones; with ``schema``, a key the checkpoint
    lacks (added by a newer version) is no difference while it holds the schema's default."""
    a, b = flatten(saved), flatten(current)
    diff = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) == b.get(k) or any(k == p or (p.endswith(".") and k.startswith(p)) for p in allowed):
            continue
        if schema is not None and k not in a and b[k] == schema_default(schema, k):
            continue
        diff.append(f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now")
    return diff


@dataclass
class Resume:
    root: Path  # <output.dir>/checkpoints
    tag: str  # step_NNNNNNNN
    state: dict  # its trainer_state.json

    @property
    def folder(self) -> Path:
        return self.root / self.tag


def find_resume(
    root: Path, config: dict, resumable: tuple[str, ...], schema: type | None = None
) -> Resume | None:
    """The latest complete checkpoint under ``root``, or None to start fresh. Decided from JSON and
    YAML alone, before any model loads: a checkpoint written with another config (other than the
    ``resumable`` keys) is refused with the differing keys named."""
    tag = latest_tag(root)
    if tag is None:
        return None
    saved = yaml.safe_load((root / tag / "config.yaml").read_text())
    diffs = config_differences(saved, config, resumable, schema)
    if diffs:
        raise UserError(
            f"{root / tag} was written by another config; refusing to resume "
            "(use a new output.dir, or restore these keys):\n  " + "\n  ".join(diffs)
        )
    return Resume(root, tag, read_state(root, tag))


def restore(resume: Resume, engine, ema, objective, ctx: RunContext) -> None:
    """Load a checkpoint into the engine (module, optimizer partitions, scheduler, loss scaler), the
    EMA shards, this rank's RNG states and the objective's state. Another world size goes through
    DeepSpeed's universal checkpoint (the engine must have been built with ``load_universal``)."""
    st = resume.state
    if st["world_size"] != ctx.world:  # converted before the process group started (stages.train)
        load_root = universal_root(resume.root)
        if not (load_root / resume.tag / "done").is_file():
            raise RuntimeError(f"{load_root / resume.tag} is not converted: call ensure_universal first")
    else:
        load_root = resume.root
    with restricted_torch_load():
        # a LoRA run's checkpoints hold no frozen base (see save_checkpoint): those weights stay as loaded
        path, _ = engine.load_checkpoint(
            str(load_root), tag=resume.tag, load_module_strict=not has_frozen(engine)
        )
    if path is None:
        raise UserError(f"DeepSpeed could not load {load_root / resume.tag}")
    if engine.global_steps != st["step"]:
        raise RuntimeError(f"checkpoint step {st['step']} but the engine restored {engine.global_steps}")
    if ema is not None:
        ema.load(resume.folder / "ema")
    load_rng(resume.folder / "rng", ctx.rank)
    objective.load_state_dict(load_objective_state(resume.folder))


def has_frozen(engine) -> bool:
    """Whether the policy has frozen parameters (a LoRA run: the base UNet)."""
    return any(not p.requires_grad for p in engine.module.parameters())


def save_rng(folder: Path, rank: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        t.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(t, str(folder / f"rank_{rank:05d}.safetensors"))


def load_rng(folder: Path, rank: int) -> None:
    f = folder / f"rank_{rank:05d}.safetensors"
    if not f.is_file():  # another world size: ranks without a saved state keep their seeded state
        return
    t = load_file(str(f))
    torch.set_rng_state(t["cpu"])
    if torch.cuda.is_available():
        states = [t[k] for k in sorted(t) if k.startswith("cuda")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def check_same_on_all_ranks(state: dict[str, torch.Tensor], what: str) -> None:
    """Collective: raise on every rank if ``state`` differs between ranks (one all-gather of a hash,
    through the collective door: on NCCL the hash travels on the GPU)."""
    if not dist.is_multi():
        return
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    mine = torch.tensor([int.from_bytes(h.digest()[:8], "little", signed=True)], dtype=torch.int64)
    if len(set(dist.all_gather_stack(mine).view(-1).tolist())) != 1:
        raise RuntimeError(
            f"{what} differs between ranks: its updates must depend only on the all-rank values they get"
        )


def save_objective_state(folder: Path, state: dict[str, torch.Tensor]) -> None:
    if state:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            str(folder / "objective.safetensors"),
        )


def load_objective_state(folder: Path) -> dict[str, torch.Tensor]:
    f = folder / "objective.safetensors"
    return load_file(str(f)) if f.is_file() else {}


def save_checkpoint(
    engine,
    ema,
    root: Path,
    step: int,
    state: dict,
    config_yaml: str,
    keep: int,
    ctx: RunContext,
    objective_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    rank = ctx.rank
    objective_state = objective_state or {}
    check_same_on_all_ranks(objective_state, "the objective's state")
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    if rank == 0 and (root / tmp_tag).exists():
        shutil.rmtree(root / tmp_tag)
    barrier()
    # LoRA: the frozen base (1.6 GiB for SD1.5 in fp16) is the model folder's and never changes: not saved
    engine.save_checkpoint(
        str(root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=has_frozen(engine)
    )
    if ema is not None:
        ema.save(root / tmp_tag / "ema")
    save_rng(root / tmp_tag / "rng", rank)
    barrier()
    final = root / tag
    if rank == 0:
        (root / tmp_tag / "config.yaml").write_text(config_yaml)
        save_objective_state(root / tmp_tag, objective_state)
        (root / tmp_tag / "trainer_state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        if final.exists():  # a checkpoint of this step from a run that was killed right after it
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        tmp_latest = root / ".latest.tmp"
        tmp_latest.write_text(tag + "\n")
        os.replace(tmp_latest, root / "latest")
        prune(root, keep)
    barrier()
    return final


def prune(root: Path, keep: int) -> None:
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
    for old in tags[:-keep] if keep > 0 else []:
        shutil.rmtree(root / old, ignore_errors=True)
        shutil.rmtree(root / "universal" / old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def _env_with_project() -> dict[str, str]:
    """This environment, with the project importable (``-m pipeline.engine.safe_load`` from any cwd)."""
    project = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project, env.get("PYTHONPATH", "")) if p)
    return env


def universal_root(root: Path) -> Path:
    return root / "universal"


def ensure_universal(root: Path, tag: str, rank: int, wait_min: float = 240.0, poll_s: float = 2.0) -> Path:
    """Convert ``tag`` to DeepSpeed's universal format; returns the folder to load from. Called before
    the process group exists: rank 0 converts (once: a ``done`` file marks it), every other rank waits
    for ``done`` (or rank 0's ``failed`` file) by polling the shared file system, for up to ``wait_min``
    minutes. No collective is open meanwhile, so a conversion longer than NCCL's timeout (SDXL: ~29 GiB
    of optimizer state read, ~60 GB written) aborts nothing."""
    out_root = universal_root(root)
    done, failed = out_root / tag / "done", out_root / f"{tag}.failed"
    if rank == 0 and not done.is_file():
        shutil.rmtree(out_root / tag, ignore_errors=True)
        out_root.mkdir(parents=True, exist_ok=True)
        failed.unlink(missing_ok=True)
        try:
            _convert_to_universal(root, tag, out_root)
        except Exception as e:
            failed.write_text(f"{type(e).__name__}: {e}\n")
            raise
        done.write_text("ok\n")
    elif rank != 0:
        deadline = time.monotonic() + 60 * wait_min
        while not done.is_file():
            if failed.is_file():
                raise UserError(
                    f"rank 0 could not convert {root / tag} to a universal checkpoint: "
                    f"{failed.read_text().strip()}"
                )
            if time.monotonic() > deadline:
                raise UserError(
                    f"waited {wait_min:g} min for rank 0 to convert {root / tag} to a universal "
                    "checkpoint (dist.universal_wait_min): is rank 0 running, and is output.dir "
                    "on a file system every node mounts?"
                )
            time.sleep(poll_s)
    return out_root


def _convert_to_universal(root: Path, tag: str, out_root: Path) -> None:
    # DeepSpeed's converter, run inside restricted_torch_load (one worker each: no child processes
    # that would escape it)
    cmd = [sys.executable, "-m", "pipeline.engine.safe_load", "deepspeed.checkpoint.ds_to_universal"]
    cmd += ["--input_folder", str(root / tag), "--output_folder", str(out_root / tag)]
    cmd += ["--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    log.info("world size changed: converting %s to a universal checkpoint", tag)
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env_with_project())
    refused = [ln for ln in p.stderr.splitlines() if ln.startswith(REFUSED_PREFIX)]
    if refused:
        raise UserError(refused[-1][len(REFUSED_PREFIX) :])
    if p.returncode:
        raise RuntimeError(f"ds_to_universal failed on {root / tag}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")


def load_checkpoint_unet(folder: Path, base_path: str, dtype: torch.dtype = torch.float32):
    """The policy UNet of a ``checkpoints/step_N`` folder: its fp32 weights consolidated from the
    ZeRO-2 partitions into the base model's UNet (with the run's LoRA adapters, per the checkpoint's
    ``config.yaml``), in ``dtype``. DeepSpeed's files are read inside ``restricted_torch_load``: a file
    holding anything but tensors and DeepSpeed's state is refused (a UserError naming it)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # heavy: on use

    folder = Path(folder)
    m = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("model", {})
    lora = lora_config(
        TrainModel(
            lora_rank=m.get("lora_rank", 0),
            lora_alpha=m.get("lora_alpha"),
            lora_targets=m.get("lora_targets", TrainModel().lora_targets),
        ),
        init=True,
    )
    hint = "evaluate the run's export/ folder (safetensors, written by stages.train) instead"
    with restricted_torch_load(hint):
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    unet = load_unet(base_path, torch.float32)
    if lora is not None:
        unet.add_adapter(lora)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if lora is not None:  # the checkpoint holds the adapters; the frozen base comes from base_path
        missing = [k for k in missing if "lora_" in k]
    if unexpected or missing:
        raise UserError(
            f"{folder}: the checkpoint's weights do not fit the UNet of {base_path} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return unet.to(dtype)
