"""Reward models that score generated images, each loaded from a local folder (never from a hub).

| scorer | backbone (transformers) | score |
|---|---|---|
| PickScore | CLIPModel (PickScore_v1 is published in this format) | logit_scale.exp() * cos(image, text) |
| HPSv2 | CLIPModel (HPS v2's open_clip ViT-H-14, converted by tools.convert_openclip) | 100 * cos(image, text) |
| LAION aesthetic | CLIPVisionModelWithProjection (ViT-L/14) + the LAION MLP head | head(normalised image embedding) |
| ImageReward | BlipForImageTextRetrieval (BLIP) + the ImageReward MLP head | (head(text-with-image [CLS]) - mean) / std |

Folder layouts: PickScore/HPSv2: a CLIPModel folder with its processor. Aesthetic: ``clip/`` + ``head.safetensors``
(or the published ``.pth`` state dict as ``head.pth``, read with ``weights_only=True``). ImageReward:
``blip/`` (model + processor) + ``head.safetensors`` with keys ``layers.{0,2,4,6,7}.{weight,bias}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072


class MLPHead(nn.Module):
    """The MLP of the LAION aesthetic predictor and of ImageReward (dropouts inactive in eval)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def load_head(folder: Path) -> MLPHead:
    if (folder / "head.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "head.safetensors"))
    elif (folder / "head.pth").is_file():
        state = torch.load(folder / "head.pth", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{folder}: no head.safetensors or head.pth")
    head = MLPHead(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head.eval()


def _need(path: str, *parts: str) -> Path:
    p = Path(path)
    for part in parts:
        if not (p / part).exists():
            raise UserError(f"{p}: missing {part}")
    return p


class Scorer:
    name = ""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def score(self, images: list, prompts: list[str]) -> np.ndarray:
        raise NotImplementedError


class ClipScorer(Scorer):
    """PickScore (scale = the model's logit scale) or HPSv2 (scale 100)."""

    def __init__(self, name: str, path: str, device, dtype, use_logit_scale: bool):
        super().__init__(device, dtype)
        from transformers import AutoProcessor, CLIPModel

        p = _need(path, "config.json")
        self.name = name
        self.model = CLIPModel.from_pretrained(p, torch_dtype=dtype).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(p)
        self.use_logit_scale = use_logit_scale

    @torch.no_grad()
    def score(self, images, prompts):
        px = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        tx = self.processor(
            text=prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        )
        img = self.model.get_image_features(pixel_values=px)
        txt = self.model.get_text_features(
            input_ids=tx["input_ids"].to(self.device), attention_mask=tx["attention_mask"].to(self.device)
        )
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = (
            nn.functional.normalize(img.float(), dim=-1) * nn.functional.normalize(txt.float(), dim=-1)
        ).sum(-1)
        scale = self.model.logit_scale.exp().float() if self.use_logit_scale else 100.0
        return (scale * cos).cpu().numpy()


class AestheticScorer(Scorer):
    name = "aesthetic"

    def __init__(self, path: str, device, dtype):
        super().__init__(device, dtype)
        from transformers import AutoProcessor, CLIPVisionModelWithProjection

        p = _need(path, "clip")
        self.clip = (
            CLIPVisionModelWithProjection.from_pretrained(p / "clip", torch_dtype=dtype).to(device).eval()
        )
        self.processor = AutoProcessor.from_pretrained(p / "clip")
        self.head = load_head(p).to(device)

    @torch.no_grad()
    def score(self, images, prompts):
        px = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        emb = nn.functional.normalize(self.clip(pixel_values=px).image_embeds.float(), dim=-1)
        return self.head(emb).cpu().numpy()


class ImageRewardScorer(Scorer):
    name = "imagereward"

    def __init__(self, path: str, device, dtype):
        super().__init__(device, dtype)
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        p = _need(path, "blip")
        self.blip = BlipForImageTextRetrieval.from_pretrained(p / "blip", torch_dtype=dtype).to(device).eval()
        self.processor = BlipProcessor.from_pretrained(p / "blip")
        self.head = load_head(p).to(device)

    @torch.no_grad()
    def score(self, images, prompts):
        px = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        tx = self.processor.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        )
        img = self.blip.vision_model(pixel_values=px).last_hidden_state
        att = torch.ones(img.shape[:-1], dtype=torch.long, device=self.device)
        out = self.blip.text_encoder(
            input_ids=tx["input_ids"].to(self.device),
            attention_mask=tx["attention_mask"].to(self.device),
            encoder_hidden_states=img,
            encoder_attention_mask=att,
        )
        r = self.head(out.last_hidden_state[:, 0, :].float())
        return ((r - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).cpu().numpy()


def build_scorers(cfg, device: torch.device, dtype: torch.dtype) -> tuple[list[Scorer], list[str]]:
    """The scorers whose path is given, and a note for each one skipped."""
    scorers, notes = [], []
    makers = {
        "pickscore": lambda p: ClipScorer("pickscore", p, device, dtype, use_logit_scale=True),
        "hpsv2": lambda p: ClipScorer("hpsv2", p, device, dtype, use_logit_scale=False),
        "aesthetic": lambda p: AestheticScorer(p, device, dtype),
        "imagereward": lambda p: ImageRewardScorer(p, device, dtype),
    }
    for name, make in makers.items():
        path = getattr(cfg, name)
        if path is None:
            notes.append(f"{name}: skipped (scorers.{name} not given)")
        else:
            scorers.append(make(path))
    return scorers, notes
