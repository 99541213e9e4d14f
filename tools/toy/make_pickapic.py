"""Write Pick-a-Pic v2-schema parquet files with real JPEG bytes, for tests, the demo and the toy world.

    python -m tools.toy.make_pickapic --out DIR --pairs N [--seed N] [--rows-per-file N] [--world W]
        [--corrupt K] [--truncated K] [--empty K] [--null-caption K]
        [--pairs-per-user N] [--minority-share F --minority-rule RULE]

Every column of Pick-a-Pic v2 that the pipeline reads is written (caption, jpg_0, jpg_1, label_0,
label_1, has_label, are_different, user_id, ranking_id, image_0_uid, image_1_uid, model_0, model_1,
best_image_uid), with ties, unlabelled rows, identical-image rows, several pairs per caption and per
user, and images of varied sizes and aspect ratios.

A toy preference world with a visible rule (``--world``), so accuracy against the truth is
measurable; the column ``true_label_0`` (1.0 when image 0 is truly better) records the truth. Rules
are graded: near-equal pairs are hard. Learnability: held-out accuracy against the truth of DPO on
the tiny model, 3000 training pairs, 200 steps x 16 pairs, one seed (tools.studies.robustness --world W):
- ``brightness`` (default): random dominant colour and brightness; the brighter image (higher
  luminance) is truly better. Measured 0.79.
- ``colour``: the caption names a colour; the image dominated by it is truly better. Measured here:
  the tiny model does not learn this caption-conditional rule within a few hundred steps (it barely
  uses its text), so it is not the benchmarks' default.
- ``warmth``: dominant colours of independent luminance, warm-cool and green-magenta components;
  the warmer image (higher R - B) is truly better, brightness carries no signal. Measured 0.77.
- ``green``: the warmth world's images with the two tints' sizes swapped (green-magenta the large
  one); the greener image (higher G - (R + B) / 2) is truly better, brightness and warmth carry no
  signal. Added late, as a world no setting was chosen on (tools.studies.noise_study's second held-out world).
  Measured 0.59 (3 seeds, tools.studies.noise_study): learnt, weakly.
- ``saturation``: chromatic colour, brightness and saturation (a blend towards grey) independent;
  the more saturated image (HSV saturation) is truly better. Measured 0.52: not learnt at this
  budget, kept as a minority rule and a hard world.
- ``daynight``: each caption asks for a bright scene ("bright day, a bright cat in the day, photo")
  or a dark one ("dark night, a dark cat at night, photo"), half each, over the brightness world's
  images; the brighter image is truly better for the first, the darker for the second, so brightness
  alone is at chance. Measured 0.61 (0.65 on pairs whose luminance differs by over 40), 0.83
  at 600 steps: learnt, but slowly, as the tiny model uses its text weakly.
Annotators (``--pairs-per-user``: pairs // N user_ids, each labelling an equal share of the rows on
average, or with ``--user-tail`` a log-normal share: a heavy tail) follow the truth, except that
``--annotator-noise`` of the labelled rows are labelled against it (a natural minority) and that a
taste minority, ``--minority-share`` of the annotators (a seeded choice), labels by
``--minority-rule`` (brightness, saturation or warmth: another world's visual rule, not the truth
reversed; ``true_label_0`` stays the world's). The command line writes ``annotators.json`` beside
the parquet files: each user_id with its group (majority / minority) and the rule it labels by. The
trainer's label flips add a synthetic minority on top. Bad rows for robustness tests are injected at
seeded positions: corrupt JPEG bytes, truncated JPEG bytes, empty bytes, null captions.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.data import pickapic
from tools.toy.vocabulary import ADJECTIVES, COLOUR_RGB, COLOURS, STYLES, SUBJECTS

GENERATORS = ["SDXL", "SD2.1", "Dreamlike", "SDXL-refiner"]
LUMA = (0.299, 0.587, 0.114)  # luminance weights of R, G, B
WORLDS = ("brightness", "colour", "saturation", "warmth", "green", "daynight")
# the visual rules a taste minority can label by in any world (the colour rule needs the colour world's pairs)
MINORITY_RULES = ("brightness", "saturation", "warmth")
# colour directions that keep the luminance: warm (redder, less blue) and magenta (less green)
WARM = np.array([1.0, -(LUMA[0] - LUMA[2]) / LUMA[1], -1.0], dtype=np.float32)
MAGENTA = np.array([1.0, -(LUMA[0] + LUMA[2]) / LUMA[1], 1.0], dtype=np.float32)
TINT = 60.0  # a warm (+1) or cool (-1) tint's size along WARM, in RGB units
CHROMATIC = [c for c in COLOURS if c not in ("white", "black")]  # colours whose saturation can vary
# daynight's captions by cue (True: a bright scene), all words of the tiny tokenizer's vocabulary; the
# cue is said twice and no colour word distracts, which the tiny model learns faster from (at 200
# steps x 16 pairs: 0.61 held-out accuracy; 0.56 with "a bright {colour} {subject} in the day, {style}")
DAYNIGHT_CAPTIONS = {
    True: "bright day, a bright {subject} in the day, {style}",
    False: "dark night, a dark {subject} at night, {style}",
}
# Pick-a-Pic v2's columns (no created_at), then the toy world's truth
SCHEMA = pa.schema(
    [*(f for f in pickapic.PICKAPIC_FIELDS if f[0] != "created_at"), ("true_label_0", pa.float64())]
)


def draw_image(
    rng: np.random.Generator,
    colour: str,
    size: tuple[int, int],
    brightness: float = 1.0,
    saturation: float = 1.0,
) -> bytes:
    """A JPEG dominated by ``colour`` (scaled by ``brightness``): a jittered background, texture
    noise and a smaller shape of another colour, so that images differ beyond their dominant colour.
    ``saturation`` < 1 then blends every pixel towards the grey of its own luminance (0: grey), which
    keeps the luminance."""
    return draw_rgb(rng, brightness * np.array(COLOUR_RGB[colour], dtype=np.float32), size, saturation)


def draw_rgb(
    rng: np.random.Generator, rgb: np.ndarray, size: tuple[int, int], saturation: float = 1.0
) -> bytes:
    """draw_image with the dominant colour given as RGB (floats, clipped to 0..255 when drawn)."""
    w, h = size
    base = rgb + rng.normal(0, 12, 3)
    arr = np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    other = COLOUR_RGB[COLOURS[int(rng.integers(len(COLOURS)))]]
    cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
    r = rng.uniform(0.08, 0.2) * min(w, h)
    box = [cx - r, cy - r, cx + r, cy + r]
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(c) for c in other))
    if saturation != 1.0:
        img = Image.fromarray(desaturate(np.asarray(img), saturation), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def desaturate(arr: np.ndarray, saturation: float) -> np.ndarray:
    """uint8 RGB pixels blended towards the grey of their own luminance: 1 keeps them, 0 is grey."""
    f = arr.astype(np.float32)
    grey = (f @ np.array(LUMA, dtype=np.float32))[..., None]
    return np.clip(np.rint(grey + saturation * (f - grey)), 0, 255).astype(np.uint8)


def luminance(colour: str) -> float:
    r, g, b = COLOUR_RGB[colour]
    return 0.299 * r + 0.587 * g + 0.114 * b


def rule_value(rule: str, rgb: np.ndarray, saturation: float = 1.0) -> float:
    """An image's value under a visual rule, from its dominant colour (RGB before jitter and noise)
    and its saturation; the image with the higher value is the better one by that rule:
    ``brightness``: luminance; ``saturation``: HSV saturation, (max - min) / max, after the blend
    towards grey (brightness scales max and min alike, so it does not enter); ``warmth``: R - B
    (which the blend towards grey scales); ``green``: G - (R + B) / 2 (the world of that name only)."""
    c = np.clip(np.asarray(rgb, dtype=np.float64), 0, 255)
    grey = float(c @ np.array(LUMA))
    if rule == "brightness":
        return grey
    if rule == "saturation":
        mixed = grey + saturation * (c - grey)
        return float((mixed.max() - mixed.min()) / max(mixed.max(), 1e-9))
    if rule == "warmth":
        return float(saturation * (c[0] - c[2]))
    if rule == "green":
        return float(saturation * (c[1] - (c[0] + c[2]) / 2))
    raise ValueError(f"rule {rule!r}: expected one of {', '.join(MINORITY_RULES)}")


def _size(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    short = int(rng.integers(lo, hi + 1))
    aspect = float(rng.choice([1.0, 1.0, 4 / 3, 3 / 2, 16 / 9]))
    long = int(round(short * aspect))
    return (long, short) if rng.random() < 0.5 else (short, long)


def minority_users(n_users: int, seed: int, share: float) -> set[int]:
    """The user_ids of the taste minority: round(share x n_users) annotators, a permutation drawn
    from the seed (a generator of its own, so the rows' draws do not depend on it)."""
    k = int(np.floor(share * n_users + 0.5))
    return {int(u) + 1000 for u in np.random.default_rng([seed, 2]).permutation(n_users)[:k]}


def _n_users(pairs: int, pairs_per_user: float) -> int:
    return max(2, int(pairs // pairs_per_user))


def user_weights(n_users: int, seed: int, user_tail: float) -> np.ndarray | None:
    """Each annotator's share of the labels: None (uniform, the default) or, with ``user_tail`` = sigma
    > 0, log-normal weights exp(sigma z), z ~ N(0, 1) (a generator of its own): a heavy tail of busy
    annotators and many with a handful of labels, as in crowd-sourced data such as Pick-a-Pic."""
    if user_tail <= 0:
        return None
    w = np.exp(user_tail * np.random.default_rng([seed, 4]).standard_normal(n_users))
    return w / w.sum()


def _check(
    world: str,
    pairs_per_user: float,
    minority_share: float,
    minority_rule: str | None,
    user_tail: float = 0.0,
) -> None:
    if world not in WORLDS:
        raise ValueError(f"world {world!r}: expected one of {', '.join(WORLDS)}")
    if pairs_per_user <= 0:
        raise ValueError(f"pairs_per_user {pairs_per_user}: expected > 0")
    if not 0.0 <= minority_share <= 1.0:
        raise ValueError(f"minority_share {minority_share}: expected in [0, 1]")
    if not 0.0 <= user_tail <= 4.0:
        raise ValueError(f"user_tail {user_tail}: expected a log-normal sigma in [0, 4] (0: uniform)")
    if minority_share > 0 and (minority_rule not in MINORITY_RULES or minority_rule == world):
        raise ValueError(
            f"minority_rule {minority_rule!r} in the {world} world: expected one of "
            f"{', '.join(r for r in MINORITY_RULES if r != world)} (a rule other than the world's)"
        )


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
    pairs_per_user: float = 6.0,
    minority_share: float = 0.0,
    minority_rule: str | None = None,
    user_tail: float = 0.0,
) -> list[dict]:
    _check(world, pairs_per_user, minority_share, minority_rule, user_tail)
    rng = np.random.default_rng(seed)
    n_users = _n_users(pairs, pairs_per_user)
    user_p = user_weights(n_users, seed, user_tail)
    user_rng = np.random.default_rng([seed, 5])
    minority = minority_users(n_users, seed, minority_share) if minority_share > 0 else set()
    # per-image saturations and tints (a warmth minority's, outside the warmth world) and the
    # minority's tie-breaks come from generators of their own; with saturation in play (the world's
    # or the minority's rule) the dominant colours are chromatic
    needs_sat = world == "saturation" or (bool(minority) and minority_rule == "saturation")
    needs_tint = world not in ("warmth", "green") and bool(minority) and minority_rule == "warmth"
    aux, tie_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 3])
    # each row's caption is drawn uniformly from pairs / pairs_per_caption captions (Pick-a-Pic: over
    # 500,000 examples over 35,000 distinct prompts in v1, i.e. about 14.3; the toy worlds use 3)
    n_captions = max(1, int(pairs // pairs_per_caption))
    captions = []  # (text, colour, day): day (daynight only) is True when the caption asks for a bright scene
    for _ in range(n_captions):
        colour = str(rng.choice(COLOURS))
        if world == "daynight":
            day = bool(rng.random() < 0.5)
            subject, style = str(rng.choice(SUBJECTS)), str(rng.choice(STYLES))
            text = DAYNIGHT_CAPTIONS[day].format(colour=colour, subject=subject, style=style)
            captions.append((text, colour, day))
        else:
            captions.append(
                (
                    f"a {rng.choice(ADJECTIVES)} {colour} {rng.choice(SUBJECTS)}, {rng.choice(STYLES)}",
                    colour,
                    None,
                )
            )
    rows = []
    for i in range(pairs):
        caption, colour, day = captions[int(rng.integers(n_captions))]
        sats = (float(aux.uniform()), float(aux.uniform())) if needs_sat else (1.0, 1.0)
        tints = (float(aux.uniform(-1, 1)), float(aux.uniform(-1, 1))) if needs_tint else (0.0, 0.0)
        if world == "colour":
            other = str(rng.choice([c for c in COLOURS if c != colour]))
            true_first = bool(rng.random() < 0.5)  # is image 0 the truly better (matching) one?
            colours, bright = ((colour, other) if true_first else (other, colour)), (1.0, 1.0)
        elif world == "warmth":  # luminance, warm-cool and green-magenta drawn independently
            colours, bright = None, None
            rgbs = tuple(
                rng.uniform(80, 170) + TINT * rng.uniform(-1, 1) * WARM + 30 * rng.uniform(-1, 1) * MAGENTA
                for _ in range(2)
            )
        elif world == "green":  # as warmth, with green-magenta the large tint and warm-cool the small one
            colours, bright = None, None
            rgbs = tuple(
                rng.uniform(80, 170) + 30 * rng.uniform(-1, 1) * WARM + TINT * rng.uniform(-1, 1) * MAGENTA
                for _ in range(2)
            )
        else:  # colour and brightness drawn independently of the saturation; white and black have none
            palette = CHROMATIC if needs_sat else COLOURS
            colours = (str(rng.choice(palette)), str(rng.choice(palette)))
            bright = (float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.3, 1.0)))
        if colours is not None:  # the dominant colour's RGB as draw_image computes it, then any tint
            rgbs = tuple(b * np.array(COLOUR_RGB[c], dtype=np.float32) for c, b in zip(colours, bright))
            rgbs = tuple(x + TINT * t * WARM if t else x for x, t in zip(rgbs, tints))
        if world in ("saturation", "warmth", "green"):
            true_first = bool(rule_value(world, rgbs[0], sats[0]) > rule_value(world, rgbs[1], sats[1]))
        elif world in ("brightness", "daynight"):
            lum0, lum1 = bright[0] * luminance(colours[0]), bright[1] * luminance(colours[1])
            true_first = bool(lum0 < lum1) if day is False else bool(lum0 > lum1)  # daynight: darker at night
        identical = bool(rng.random() < identical_rate)
        jpg0 = draw_rgb(rng, rgbs[0], _size(rng, min_size, max_size), sats[0])
        jpg1 = jpg0 if identical else draw_rgb(rng, rgbs[1], _size(rng, min_size, max_size), sats[1])
        uid0, uid1 = (str(uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | i)) for _ in range(2))
        u, agrees = rng.random(), True
        if u < unlabelled_rate:
            has_label, l0 = False, 0.0
        elif u < unlabelled_rate + tie_rate:
            has_label, l0 = True, 0.5
        else:
            agrees = rng.random() >= annotator_noise
            has_label, l0 = True, float(true_first == agrees)
        user_id = int(rng.integers(n_users)) + 1000  # drawn even with a tail: the images stay the same
        if user_p is not None:
            user_id = int(user_rng.choice(n_users, p=user_p)) + 1000
        model_0, model_1 = str(rng.choice(GENERATORS)), str(rng.choice(GENERATORS))
        if user_id in minority and has_label and l0 != 0.5:  # labels by its own rule (annotator noise too)
            m0, m1 = (rule_value(minority_rule, x, sat) for x, sat in zip(rgbs, sats))
            m_first = bool(tie_rng.random() < 0.5) if m0 == m1 else bool(m0 > m1)
            l0 = float(m_first == agrees)
        rows.append(
            {
                "caption": caption,
                "jpg_0": jpg0,
                "jpg_1": jpg1,
                "label_0": l0,
                "label_1": 1.0 - l0 if has_label else 0.0,
                "has_label": has_label,
                "are_different": not identical,
                "user_id": user_id,
                "ranking_id": 500_000 + i,
                "image_0_uid": uid0,
                "image_1_uid": uid1,
                "model_0": model_0,
                "model_1": model_1,
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


def annotators(
    pairs: int,
    seed: int = 0,
    world: str = "brightness",
    pairs_per_user: float = 6.0,
    minority_share: float = 0.0,
    minority_rule: str | None = None,
    user_tail: float = 0.0,
) -> dict:
    """Who labels make_rows' pairs (called with the same arguments): every user_id with its group,
    "majority" (labels by the world's rule) or "minority" (by ``minority_rule``), and that rule."""
    _check(world, pairs_per_user, minority_share, minority_rule, user_tail)
    n_users = _n_users(pairs, pairs_per_user)
    minority = minority_users(n_users, seed, minority_share) if minority_share > 0 else set()
    return {
        "world": world,
        "minority_rule": minority_rule if minority else None,
        "minority_share": minority_share,
        "pairs_per_user": pairs_per_user,
        **({"user_tail": user_tail} if user_tail > 0 else {}),
        "annotators": [
            {"user_id": u, "group": "minority", "rule": minority_rule}
            if u in minority
            else {"user_id": u, "group": "majority", "rule": world}
            for u in range(1000, 1000 + n_users)
        ],
    }


def write_annotators(info: dict, out: Path) -> Path:
    """``annotators.json`` beside the parquet files (readers of the data list only *.parquet)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "annotators.json"
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.toy.make_pickapic", description=__doc__.split("\n\n")[0]
    )
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
    p.add_argument("--world", choices=WORLDS, default="brightness", help="the true preference rule")
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
    p.add_argument(
        "--pairs-per-user",
        type=float,
        default=6.0,
        help="rows per annotator on average: pairs // this many user_ids (at least 2)",
    )
    p.add_argument(
        "--minority-share",
        type=float,
        default=0.0,
        help="share of the annotators (a seeded choice) who label by --minority-rule instead of the world's",
    )
    p.add_argument(
        "--minority-rule",
        choices=MINORITY_RULES,
        default=None,
        help="the taste minority's rule (another world's visual rule); true_label_0 stays the world's",
    )
    p.add_argument(
        "--user-tail",
        type=float,
        default=0.0,
        help="log-normal sigma of the annotators' label counts (0: uniform; 1.5: a heavy tail, many with a "
        "handful of labels, a few with hundreds)",
    )
    a = p.parse_args(argv)
    if a.minority_share > 0 and (a.minority_rule is None or a.minority_rule == a.world):
        p.error(f"--minority-share needs a --minority-rule other than the world's ({a.world})")
    rows = make_rows(
        a.pairs,
        a.seed,
        a.min_size,
        a.max_size,
        a.tie_rate,
        a.unlabelled_rate,
        a.identical_rate,
        a.annotator_noise,
        a.world,
        a.corrupt,
        a.truncated,
        a.empty,
        a.null_caption,
        a.pairs_per_caption,
        a.pairs_per_user,
        a.minority_share,
        a.minority_rule,
        a.user_tail,
    )
    paths = write_parquet(rows, Path(a.out), a.rows_per_file)
    info = annotators(
        a.pairs, a.seed, a.world, a.pairs_per_user, a.minority_share, a.minority_rule, a.user_tail
    )
    write_annotators(info, Path(a.out))
    n_min = sum(x["group"] == "minority" for x in info["annotators"])
    print(
        f"wrote {len(rows)} rows in {len(paths)} parquet file(s) to {a.out}, and annotators.json "
        f"({len(info['annotators'])} annotators, {n_min} in the minority)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
