"""Find and load the UNets to evaluate: exported UNet folders, LoRA folders, DeepSpeed checkpoints
(``checkpoints/step_N``), or run folders (their ``export/``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.engine.checkpoint import load_checkpoint_unet
from pipeline.errors import UserError
from pipeline.models import ModelInfo, load_unet


@dataclass
class UNetSpec:
    name: str
    kind: str  # unet | lora | checkpoint
    path: Path
    run_config: dict | None = None  # the training config, when known (for the flipped-label view)


def _run_config(path: Path) -> dict | None:
    for cand in (path / "config.yaml", path.parent / "config.yaml", path.parent.parent / "config.yaml"):
        if cand.is_file():
            return yaml.safe_load(cand.read_text())
    return None


def resolve(name: str, path: str, include_ema: bool = True) -> list[UNetSpec]:
    p = Path(path)
    if (p / "pytorch_lora_weights.safetensors").is_file():
        return [UNetSpec(name, "lora", p, _run_config(p.parent))]
    if (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model*.safetensors")):
        return [UNetSpec(name, "unet", p, _run_config(p.parent))]
    if (p / "trainer_state.json").is_file():
        return [UNetSpec(name, "checkpoint", p, yaml.safe_load((p / "config.yaml").read_text()))]
    if (p / "export").is_dir():
        out = []
        for sub in sorted((p / "export").iterdir()):
            is_ema = "_ema_" in sub.name
            if is_ema and not include_ema:
                continue
            suffix = sub.name.split("_ema_", 1)[1] if is_ema else ""
            out += resolve(f"{name}:ema{suffix}" if is_ema else name, str(sub))
        if out:
            return out
    raise UserError(
        f"models.unets.{name}={path}: not a UNet folder, LoRA folder, checkpoints/step_N or run folder"
    )


def load(spec: UNetSpec, info: ModelInfo, dtype: torch.dtype):
    """The UNet of ``spec`` as a module (LoRA merged into a copy of the base UNet)."""
    if spec.kind == "unet":
        return load_unet(str(spec.path), dtype, subfolder=None)
    if spec.kind == "lora":
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if info.family.name == "sdxl" else StableDiffusionPipeline
        unet = load_unet(info.path, torch.float32)
        state, alphas = cls.lora_state_dict(str(spec.path))
        cls.load_lora_into_unet(state, alphas, unet)
        return unet.to(dtype)
    # a DeepSpeed checkpoint: consolidate the fp32 weights from the ZeRO partitions
    return load_checkpoint_unet(spec.path, info.path, dtype)
