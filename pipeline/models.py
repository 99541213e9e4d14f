"""Open a diffusers Stable Diffusion folder. The model family (sd15 / sdxl) is data read from the folder.

Everything that differs between SD1.5 and SDXL is a field of ``Family``; no code path branches on a
family name except through these fields.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    text_encoders: tuple[str, ...]  # component folders, in concatenation order
    tokenizers: tuple[str, ...]
    hidden_state_index: (
        int  # which hidden state of each text encoder is the conditioning (-1 last, -2 penultimate)
    )
    pooled_from: str | None  # the encoder whose projected output is the pooled embedding (SDXL)
    uses_time_ids: bool  # SDXL's micro-conditioning: original size, crop offsets, target size


SD15 = Family("sd15", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), -1, None, False)
SDXL = Family(
    "sdxl",
    "StableDiffusionXLPipeline",
    ("text_encoder", "text_encoder_2"),
    ("tokenizer", "tokenizer_2"),
    -2,
    "text_encoder_2",
    True,
)
FAMILIES = {f.pipeline_class: f for f in (SD15, SDXL)}


@dataclass(frozen=True)
class ModelInfo:
    path: str
    family: Family
    config_hash: str  # sha256 of the component configs: the model's identity in manifests and checkpoints
    vae_scale_factor: int  # pixels per latent cell (8 for SD)
    latent_channels: int
    scaling_factor: float
    text_dim: int  # width of the conditioning hidden states (both encoders concatenated for SDXL)
    pooled_dim: int | None
    prediction_type: str  # scheduler's: epsilon | v_prediction | sample
    num_train_timesteps: int

    def as_dict(self) -> dict:
        return {"path": self.path, "family": self.family.name, "config_hash": self.config_hash}


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path.parent}: not a diffusers model folder (no {path.name}; {what})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


def inspect_model(path: str | Path) -> ModelInfo:
    """Read the folder's JSON configs only (no weights) and describe the model; UserError if it is
    not a Stable Diffusion folder in the diffusers layout."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"model.path={path}: no such directory (give a local diffusers model folder)")
    index = _read_json(root / "model_index.json", "expected a diffusers pipeline folder")
    cls = index.get("_class_name")
    if cls not in FAMILIES:
        raise UserError(f"{root}/model_index.json: _class_name {cls!r} is not one of {', '.join(FAMILIES)}")
    family = FAMILIES[cls]
    configs = {"model_index": index}
    for comp in ("unet", "vae", "scheduler", *family.text_encoders):
        fname = "scheduler_config.json" if comp == "scheduler" else "config.json"
        configs[comp] = _read_json(root / comp / fname, f"component {comp} missing")
    for tok in family.tokenizers:
        if not (root / tok).is_dir():
            raise UserError(f"{root}: component {tok} missing")
    stable = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in configs.items()}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()
    vae = configs["vae"]
    text_dim = sum(int(configs[c]["hidden_size"]) for c in family.text_encoders)
    pooled = int(configs[family.pooled_from]["projection_dim"]) if family.pooled_from else None
    unet_cross = configs["unet"].get("cross_attention_dim")
    if isinstance(unet_cross, int) and unet_cross != text_dim:
        raise UserError(f"{root}: unet cross_attention_dim {unet_cross} != text encoder width {text_dim}")
    return ModelInfo(
        path=str(root.resolve()),
        family=family,
        config_hash=digest,
        vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        latent_channels=int(vae.get("latent_channels", 4)),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        text_dim=text_dim,
        pooled_dim=pooled,
        prediction_type=configs["scheduler"].get("prediction_type", "epsilon"),
        num_train_timesteps=int(configs["scheduler"].get("num_train_timesteps", 1000)),
    )


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the configs' one vocabulary


def load_vae(info: ModelInfo, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(info.path, subfolder="vae", torch_dtype=dtype).to(device).eval()


def load_text_encoders(info: ModelInfo, dtype: torch.dtype, device: torch.device) -> tuple[list, list]:
    """(tokenizers, text encoders) in the family's order; the pooled encoder loads with its projection."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    toks = [CLIPTokenizer.from_pretrained(info.path, subfolder=t) for t in info.family.tokenizers]
    encs = []
    for name in info.family.text_encoders:
        cls = CLIPTextModelWithProjection if name == info.family.pooled_from else CLIPTextModel
        encs.append(cls.from_pretrained(info.path, subfolder=name, torch_dtype=dtype).to(device).eval())
    return toks, encs


def load_unet(path: str, dtype: torch.dtype = torch.float32, subfolder: str | None = "unet"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)


def load_scheduler(info: ModelInfo):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(info.path, subfolder="scheduler")


def free_device(device: torch.device) -> None:
    """Give the device's cached blocks back once a model is dropped (the caching allocator keeps them)."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto``: this job's GPU (LOCAL_RANK) when CUDA is present, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is visible; use device=cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)
