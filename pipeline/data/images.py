"""Decode JPEG bytes, resize the shorter side and centre-crop, keeping SDXL's size/crop ids.

Two limits keep one hostile row from taking a 959k-row job down: a source image may hold at most
``MAX_SOURCE_PIXELS`` pixels (read from the header, before anything is decoded; PIL's own
decompression-bomb check is caught as well), and the resized image before the crop at most
``MAX_RESIZED_AREA`` times the output square (a 1x20000 PNG at 512 px would otherwise be resized to
512 x 10,240,000 px, about 15 GB). Either is a counted skip (``image_too_large``, ``extreme_aspect``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_SOURCE_PIXELS = 8192 * 8192  # Pick-a-Pic's images are at most a few megapixels
MAX_RESIZED_AREA = 16  # resized image <= 16 output squares: aspect ratios up to 16:1 are kept


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
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageDecodeError("image_too_large", str(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("corrupt_image", str(e)) from e
    w, h = img.size
    if w * h > MAX_SOURCE_PIXELS:
        raise ImageDecodeError("image_too_large", f"{w}x{h} px declared, more than {MAX_SOURCE_PIXELS} px")
    try:
        img.load()  # forces the full decode: a truncated file raises here, not later
    except Image.DecompressionBombError as e:
        raise ImageDecodeError("image_too_large", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("corrupt_image", str(e)) from e
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int) -> Prepared:
    """Resize (bilinear, antialiased) so the shorter side is ``resolution``, then centre-crop a square;
    the crop offsets are rounded as in diffusers' SDXL training scripts."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if nw * nh > MAX_RESIZED_AREA * resolution * resolution:
        raise ImageDecodeError(
            "extreme_aspect",
            f"{w}x{h} px would be resized to {nw}x{nh} px before the crop (aspect > {MAX_RESIZED_AREA}:1)",
        )
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    top = max(0, int(round((nh - resolution) / 2.0)))
    left = max(0, int(round((nw - resolution) / 2.0)))
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return Prepared(pixels=np.ascontiguousarray(arr), original_size=(h, w), crop_top_left=(top, left))


def prepare(data: bytes | None, resolution: int) -> Prepared:
    return resize_center_crop(decode(data), resolution)
