"""Decode JPEG bytes, resize the shorter side and centre-crop, keeping SDXL's size/crop ids."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image; ``reason`` is the skip reason counted by the encode stage."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass
class Prepared:
    pixels: np.ndarray  # float32 [3, R, R] in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the source image
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def decode(data: bytes | None) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty_image", "no image bytes")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # forces the full decode: a truncated file raises here, not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("corrupt_image", str(e)) from e
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int) -> Prepared:
    """Resize (bilinear, antialiased) so the shorter side is ``resolution``, then centre-crop a square;
    the crop offsets are rounded as in diffusers' SDXL training scripts."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    top = max(0, int(round((nh - resolution) / 2.0)))
    left = max(0, int(round((nw - resolution) / 2.0)))
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return Prepared(pixels=np.ascontiguousarray(arr), original_size=(h, w), crop_top_left=(top, left))


def prepare(data: bytes | None, resolution: int) -> Prepared:
    return resize_center_crop(decode(data), resolution)
