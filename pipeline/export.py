"""Export trained weights as folders ``StableDiffusionPipeline`` (or the SDXL one) loads.

Full fine-tuning: a diffusers UNet folder (``config.json`` + safetensors) per model.
LoRA: ``pytorch_lora_weights.safetensors`` in the diffusers LoRA format, loaded with
``pipe.load_lora_weights(folder)``.

Memory: only rank 0 ever holds a whole model. Each model (the policy's fp32 master partitions, each
EMA model's shards) is streamed to rank 0 in chunks of every rank's slice (``stream_to_rank0``): the
other ranks hold one chunk at a time on top of what training already held, rank 0 the destination
model (one fp32 UNet, reused for every model it writes) plus one chunk per rank.
"""

from __future__ import annotations

import bisect
import shutil
from pathlib import Path

import torch

from pipeline.engine.context import RunContext
from pipeline.engine.dist import barrier, gather_to_rank0
from pipeline.models import load_unet

# elements per rank and collective: 16 MiB of fp32 from each rank, world x that on rank 0
CHUNK = 1 << 22


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def new_export_unet(model_path: str) -> torch.nn.Module:
    """An fp32 UNet of the config in ``model_path`` (random weights, to be overwritten)."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(model_path, subfolder="unet")
    return UNet2DConditionModel.from_config(config)


def save_unet(unet: torch.nn.Module, out: Path) -> Path:
    """``unet`` as a diffusers UNet folder at ``out`` (written next to it, then renamed)."""
    tmp = _atomic_dir(out)
    unet.save_pretrained(tmp, safe_serialization=True)
    _commit(tmp, out)
    return out


def export_full_unet(state: dict[str, torch.Tensor], model_path: str, out: Path) -> Path:
    """``state``: every UNet parameter (fp32). Written as a diffusers UNet folder."""
    unet = new_export_unet(model_path)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(
            f"export: state does not match the UNet (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return save_unet(unet, out)


def export_lora(
    state: dict[str, torch.Tensor], model_path: str, lora_config, pipeline_class: str, out: Path
) -> Path:
    """``state``: the LoRA parameters by their names in the training module. Every LoRA parameter
    of the adapted UNet must be in it, and nothing else: a name mismatch would otherwise export the
    adapters' initial weights without a word."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = load_unet(model_path, torch.float32)
    unet.add_adapter(lora_config)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    missing_lora = [k for k in missing if "lora_" in k]  # the base UNet's weights are missing by design
    if unexpected or missing_lora:
        raise RuntimeError(
            f"LoRA export to {out}: the trained LoRA weights do not match the adapters of the UNet in "
            f"{model_path} ({len(missing_lora)} LoRA parameters missing, e.g. {missing_lora[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tmp = _atomic_dir(out)
    getattr(diffusers, pipeline_class).save_lora_weights(
        tmp, unet_lora_layers=layers, safe_serialization=True
    )
    _commit(tmp, out)
    return out


@torch.no_grad()
def stream_to_rank0(
    layout,
    parts: list[torch.Tensor],
    dest: dict[str, torch.Tensor] | None,
    device: torch.device,
    chunk: int = CHUNK,
) -> None:
    """Collective (every rank calls it, in the same order): copy the full model whose rank slices are
    ``parts`` (this rank's slice of each flat group, as ``layout.local_partitions()`` or an EMA
    shard row; any device, cast to fp32) into ``dest`` on rank 0 (name -> contiguous fp32 CPU tensor
    of the parameter's shape; every layout name). Other ranks pass ``dest=None`` and hold one chunk
    of ``chunk`` elements at a time; rank 0 receives one chunk per rank per collective."""
    rank = layout.rank
    if (rank == 0) != (dest is not None):
        raise ValueError("stream_to_rank0: dest on rank 0 only")
    for lay, part in zip(layout.groups, parts):
        P = lay.partition
        if part.numel() != P:
            raise ValueError(f"stream_to_rank0: a slice of {part.numel()} elements, the layout says {P}")
        if rank == 0:
            order = sorted(range(len(lay.names)), key=lambda i: lay.offsets[i])
            starts = [lay.offsets[i] for i in order]
            views = [dest[lay.names[i]].view(-1) for i in order]
        for lo in range(0, P, chunk):
            n = min(chunk, P - lo)
            mine = part[lo : lo + n].to(device=device, dtype=torch.float32)
            got = gather_to_rank0(mine)  # rank 0: one piece per rank, on the collective's device
            del mine
            if rank != 0:
                continue
            for r, piece in enumerate(got):
                a0 = r * P + lo  # flat position of piece[0]
                b0 = min(a0 + n, lay.numel)
                piece = piece.cpu()
                i = max(bisect.bisect_right(starts, a0) - 1, 0)
                while i < len(starts) and starts[i] < b0:
                    v = views[i]
                    a, b = max(a0, starts[i]), min(b0, starts[i] + v.numel())
                    if a < b:
                        v[a - starts[i] : b - starts[i]].copy_(piece[a - a0 : b - a0])
                    i += 1


def export_models(
    layout,
    ema,
    decays: list[float],
    lora,
    model_path: str,
    pipeline_class: str,
    out: Path,
    ctx: RunContext,
) -> Path:
    """Collective: the policy (``unet``) and every EMA model (``unet_ema_<decay>``) under ``out``, as
    diffusers UNet folders of the UNet config in ``model_path``, or LoRA weights (``lora``,
    ``lora_ema_<decay>``; ``pipeline_class`` writes them) for LoRA runs. One model at a time, streamed
    to rank 0 (``stream_to_rank0``): no rank but 0 holds a whole model."""
    rank = ctx.rank
    models = [("unet", lambda: layout.local_partitions())]
    models += [(f"unet_ema_{d:g}", lambda k=k: ema.shards[k]) for k, d in enumerate(decays)]
    unet = None
    if rank == 0:
        if lora is not None:  # the LoRA parameters alone, by their names in the training module
            dest = {
                n: torch.zeros(s, dtype=torch.float32)
                for g in layout.groups
                for n, s in zip(g.names, g.shapes)
            }
        else:  # stream straight into one UNet's parameters, reused for every model
            unet = new_export_unet(model_path)
            params = dict(unet.named_parameters())
            shapes = {n: s for g in layout.groups for n, s in zip(g.names, g.shapes)}
            names = list(shapes)
            missing = sorted(set(params) - set(names))
            unexpected = sorted(set(names) - set(params))
            wrong = [n for n in names if n in params and params[n].shape != shapes[n]]
            if missing or unexpected or wrong:
                raise RuntimeError(
                    f"export: state does not match the UNet (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                    f"other shapes {wrong[:3]})"
                )
            dest = {n: params[n].data for n in names}
    else:
        dest = None
    for name, parts in models:
        stream_to_rank0(layout, parts(), dest, ctx.device)
        if rank != 0:
            continue
        if lora is not None:
            export_lora(dest, model_path, lora, pipeline_class, out / name.replace("unet", "lora"))
        else:
            save_unet(unet, out / name)
    barrier()
    return out
