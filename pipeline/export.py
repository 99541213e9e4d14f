"""Export trained weights as folders ``StableDiffusionPipeline`` (or the SDXL one) loads.

Full fine-tuning: a diffusers UNet folder (``config.json`` + safetensors) per model.
LoRA: ``pytorch_lora_weights.safetensors`` in the diffusers LoRA format, loaded with
``pipe.load_lora_weights(folder)``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pipeline.models import load_unet


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def export_full_unet(state: dict[str, torch.Tensor], model_path: str, out: Path) -> Path:
    """``state``: every UNet parameter (fp32). Written as a diffusers UNet folder."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(model_path, subfolder="unet")
    unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(
            f"export: state does not match the UNet (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    tmp = _atomic_dir(out)
    unet.save_pretrained(tmp, safe_serialization=True)
    _commit(tmp, out)
    return out


def export_lora(
    state: dict[str, torch.Tensor], model_path: str, lora_config, pipeline_class: str, out: Path
) -> Path:
    """``state``: the LoRA parameters by their names in the training module."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = load_unet(model_path, torch.float32)
    unet.add_adapter(lora_config)
    unet.load_state_dict(state, strict=False)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tmp = _atomic_dir(out)
    getattr(diffusers, pipeline_class).save_lora_weights(
        tmp, unet_lora_layers=layers, safe_serialization=True
    )
    _commit(tmp, out)
    return out


def export_models(
    layout,
    ema,
    decays: list[float],
    lora,
    model_path: str,
    pipeline_class: str,
    out: Path,
    rank: int,
    device: torch.device,
) -> Path:
    """Collective: the policy (``unet``) and every EMA model (``unet_ema_<decay>``) under ``out``, as
    diffusers UNet folders of the UNet config in ``model_path``, or LoRA weights (``lora``,
    ``lora_ema_<decay>``; ``pipeline_class`` writes them) for LoRA runs."""
    from pipeline.engine.dist import barrier

    models = [("unet", layout.new_flats(torch.float32, device))]
    layout.gather_into(layout.local_partitions(), models[0][1])
    models[0] = ("unet", [f.cpu() for f in models[0][1]])
    for k, d in enumerate(decays):
        models.append((f"unet_ema_{d:g}", ema.full(k)))
    if rank == 0:
        for name, flats in models:
            state = {n: t.clone() for n, t in layout.state_dict(flats).items()}
            if lora is not None:
                export_lora(state, model_path, lora, pipeline_class, out / name.replace("unet", "lora"))
            else:
                export_full_unet(state, model_path, out / name)
    barrier()
    return out
