"""Write Pick-a-Pic v2-schema parquet files with real JPEG bytes, for tests, the demo and the toy world.

    python -m tools.make_pickapic --out DIR --pairs N [--seed N] [--rows-per-file N]
        [--corrupt K] [--truncated K] [--empty K] [--null-caption K]

Every column of Pick-a-Pic v2 that the pipeline reads is written (caption, jpg_0, jpg_1, label_0,
label_1, has_label, are_different, user_id, ranking_id, image_0_uid, image_1_uid, model_0, model_1,
best_image_uid), with ties, unlabelled rows, identical-image rows, several pairs per caption and per
user, and images of varied sizes and aspect ratios.

A toy preference world with a visible rule (``--world``), so accuracy against the truth is
measurable; the column ``true_label_0`` (1.0 when image 0 is truly better) records the truth:
- ``brightness`` (default): each image has a random dominant colour and a random brightness; the
  brighter image (higher mean luminance) is truly better. Graded: near-equal pairs are hard.
- ``colour``: the caption names a colour; the image dominated by it is truly better. Measured here:
  the tiny model does not learn this caption-conditional rule within a few hundred steps (it barely
  uses its text), so it is not the benchmarks' default.
Annotators follow the truth, except that ``--annotator-noise`` of the labelled rows are labelled
against it (a natural minority); the trainer's label flips add a synthetic minority on top.
Bad rows for robustness tests are injected at seeded positions: corrupt JPEG bytes, truncated JPEG
bytes, empty bytes, null captions.
"""

from __future__ import annotations

import argparse
import io
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from tools.vocabulary import ADJECTIVES, COLOUR_RGB, COLOURS, STYLES, SUBJECTS

GENERATORS = ["SDXL", "SD2.1", "Dreamlike", "SDXL-refiner"]
SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("has_label", pa.bool_()),
        ("are_different", pa.bool_()),
        ("user_id", pa.int64()),
        ("ranking_id", pa.int64()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("best_image_uid", pa.string()),
        ("true_label_0", pa.float64()),
    ]
)


def draw_image(
    rng: np.random.Generator, colour: str, size: tuple[int, int], brightness: float = 1.0
) -> bytes:
    """A JPEG dominated by ``colour`` (scaled by ``brightness``): a jittered background, texture
    noise and a smaller shape of another colour, so that images differ beyond their dominant colour."""
    w, h = size
    base = brightness * np.array(COLOUR_RGB[colour], dtype=np.float32) + rng.normal(0, 12, 3)
    arr = np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    other = COLOUR_RGB[COLOURS[int(rng.integers(len(COLOURS)))]]
    cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
    r = rng.uniform(0.08, 0.2) * min(w, h)
    box = [cx - r, cy - r, cx + r, cy + r]
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(c) for c in other))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def luminance(colour: str) -> float:
    r, g, b = COLOUR_RGB[colour]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _size(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    short = int(rng.integers(lo, hi + 1))
    aspect = float(rng.choice([1.0, 1.0, 4 / 3, 3 / 2, 16 / 9]))
    long = int(round(short * aspect))
    return (long, short) if rng.random() < 0.5 else (short, long)


def make_rows(
    pairs: int,
    seed: int = 0,
    min_size: int = 64,
    max_size: int = 128,
    tie_rate: float = 0.05,
    unlabelled_rate: float = 0.03,
    identical_rate: float = 0.02,
    annotator_noise: float = 0.0,
    world: str = "brightness",
    corrupt: int = 0,
    truncated: int = 0,
    empty: int = 0,
    null_caption: int = 0,
    pairs_per_caption: float = 3.0,
) -> list[dict]:
    rng = np.random.default_rng(seed)
    n_users = max(2, pairs // 6)
    # each row's caption is drawn uniformly from pairs / pairs_per_caption captions (Pick-a-Pic: over
    # 500,000 examples over 35,000 distinct prompts in v1, i.e. about 14.3; the toy worlds use 3)
    n_captions = max(1, int(pairs // pairs_per_caption))
    captions = []
    for _ in range(n_captions):
        colour = str(rng.choice(COLOURS))
        captions.append(
            (f"a {rng.choice(ADJECTIVES)} {colour} {rng.choice(SUBJECTS)}, {rng.choice(STYLES)}", colour)
        )
    rows = []
    for i in range(pairs):
        caption, colour = captions[int(rng.integers(n_captions))]
        if world == "colour":
            other = str(rng.choice([c for c in COLOURS if c != colour]))
            true_first = bool(rng.random() < 0.5)  # is image 0 the truly better (matching) one?
            colours, bright = ((colour, other) if true_first else (other, colour)), (1.0, 1.0)
        elif world == "brightness":
            colours = (str(rng.choice(COLOURS)), str(rng.choice(COLOURS)))
            bright = (float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.3, 1.0)))
            true_first = bool(bright[0] * luminance(colours[0]) > bright[1] * luminance(colours[1]))
        else:
            raise ValueError(f"world {world!r}: expected brightness or colour")
        identical = bool(rng.random() < identical_rate)
        jpg0 = draw_image(rng, colours[0], _size(rng, min_size, max_size), bright[0])
        jpg1 = jpg0 if identical else draw_image(rng, colours[1], _size(rng, min_size, max_size), bright[1])
        uid0, uid1 = (str(uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | i)) for _ in range(2))
        u = rng.random()
        if u < unlabelled_rate:
            has_label, l0 = False, 0.0
        elif u < unlabelled_rate + tie_rate:
            has_label, l0 = True, 0.5
        else:
            agrees = rng.random() >= annotator_noise
            has_label, l0 = True, float(true_first == agrees)
        rows.append(
            {
                "caption": caption,
                "jpg_0": jpg0,
                "jpg_1": jpg1,
                "label_0": l0,
                "label_1": 1.0 - l0 if has_label else 0.0,
                "has_label": has_label,
                "are_different": not identical,
                "user_id": int(rng.integers(n_users)) + 1000,
                "ranking_id": 500_000 + i,
                "image_0_uid": uid0,
                "image_1_uid": uid1,
                "model_0": str(rng.choice(GENERATORS)),
                "model_1": str(rng.choice(GENERATORS)),
                "best_image_uid": uid0 if l0 == 1.0 else (uid1 if has_label and l0 == 0.0 else ""),
                "true_label_0": float(true_first),
            }
        )
    # bad rows at seeded, distinct positions
    bad = rng.permutation(pairs)
    pos = 0
    for kind, count in (
        ("corrupt", corrupt),
        ("truncated", truncated),
        ("empty", empty),
        ("null", null_caption),
    ):
        for _ in range(count):
            if pos >= pairs:
                raise ValueError("more bad rows requested than pairs")
            row = rows[int(bad[pos])]
            pos += 1
            row["has_label"], row["are_different"], row["label_0"], row["label_1"] = True, True, 1.0, 0.0
            if kind == "corrupt":
                b = bytearray(row["jpg_1"])
                b[2:] = bytes(
                    rng.integers(0, 256, len(b) - 2, dtype=np.uint8)
                )  # JPEG marker kept, body garbage
                row["jpg_1"] = bytes(b)
            elif kind == "truncated":
                row["jpg_0"] = row["jpg_0"][: len(row["jpg_0"]) // 3]
            elif kind == "empty":
                row["jpg_0"] = b""
            else:
                row["caption"] = None
    return rows


def write_parquet(rows: list[dict], out: Path, rows_per_file: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    n_files = max(1, -(-len(rows) // rows_per_file))
    paths = []
    for f in range(n_files):
        chunk = rows[f * rows_per_file : (f + 1) * rows_per_file]
        table = pa.Table.from_pylist(chunk, schema=SCHEMA)
        path = out / f"train-{f:05d}-of-{n_files:05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp, row_group_size=64)
        tmp.replace(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_pickapic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument(
        "--pairs", type=int, required=True, help="rows to write (before ties/unlabelled are dropped)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-file", type=int, default=500)
    p.add_argument("--min-size", type=int, default=64, help="shorter image side, lower bound (px)")
    p.add_argument("--max-size", type=int, default=128, help="shorter image side, upper bound (px)")
    p.add_argument("--tie-rate", type=float, default=0.05)
    p.add_argument("--unlabelled-rate", type=float, default=0.03)
    p.add_argument("--identical-rate", type=float, default=0.02)
    p.add_argument(
        "--annotator-noise", type=float, default=0.0, help="share of labels against the true preference"
    )
    p.add_argument(
        "--world", choices=["brightness", "colour"], default="brightness", help="the true preference rule"
    )
    p.add_argument("--corrupt", type=int, default=0, help="rows with corrupt JPEG bytes")
    p.add_argument("--truncated", type=int, default=0, help="rows with truncated JPEG bytes")
    p.add_argument("--empty", type=int, default=0, help="rows with empty image bytes")
    p.add_argument("--null-caption", type=int, default=0, help="rows with a null caption")
    p.add_argument(
        "--pairs-per-caption",
        type=float,
        default=3.0,
        help="mean rows per distinct caption (Pick-a-Pic v1: over 500k examples over 35k prompts, ~14.3)",
    )
    a = p.parse_args(argv)
    rows = make_rows(
        a.pairs, a.seed, a.min_size, a.max_size, a.tie_rate, a.unlabelled_rate, a.identical_rate,
        a.annotator_noise, a.world, a.corrupt, a.truncated, a.empty, a.null_caption, a.pairs_per_caption,
    )  # fmt: skip
    paths = write_parquet(rows, Path(a.out), a.rows_per_file)
    print(f"wrote {len(rows)} rows in {len(paths)} parquet file(s) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
