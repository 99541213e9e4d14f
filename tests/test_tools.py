"""tools.toy.make_tiny_model and tools.toy.make_pickapic: offline-loadable, deterministic, Pick-a-Pic schema."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tools.toy.make_pickapic import SCHEMA, make_rows, write_parquet
from tools.toy.make_tiny_model import build_clip_bpe, make_tiny_model


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_tiny_model_is_deterministic_for_a_seed(tiny_sd15, tmp_path):
    again = make_tiny_model("sd15", tmp_path / "again", seed=0)
    other = make_tiny_model("sd15", tmp_path / "other", seed=1)
    assert _digest(again) == _digest(tiny_sd15)
    assert _digest(other) != _digest(tiny_sd15)


# Two "hosts" on this machine: the thread count and the vector kernels PyTorch and MKL may use, as a
# user's machine differs from CI's (AVX512 / AMX or only AVX2; 1 or 2 threads, OMP_NUM_THREADS set or not).
HOSTS = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads, AVX2 kernels": {
        "OMP_NUM_THREADS": "2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
}


def _rows_digest(folder) -> str:
    """The toy data's content (not the parquet file's bytes, whose metadata names the pyarrow version)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            h.update(repr(sorted(row.items())).encode())
    return h.hexdigest()


@pytest.mark.slow
def test_tiny_model_with_a_trained_vae_and_the_toy_data_are_the_same_bytes_at_any_thread_count(tmp_path):
    """The VAE training is the one float-order-sensitive part of the builder (tools/toy/make_tiny_model.py:
    before it was pinned, 1 and 2 threads wrote VAEs with scaling factors 0.806 and 0.819)."""
    import os

    from tests.helpers.run import ROOT, env

    digests = {}
    for name, extra in HOSTS.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        e = env(**extra)
        if "OMP_NUM_THREADS" not in extra:
            e.pop("OMP_NUM_THREADS")
        for cmd in (
            [
                "tools.toy.make_tiny_model",
                "--family",
                "sd15",
                "--out",
                str(out / "model"),
                "--seed",
                "3",
                "--vae-steps",
                "12",
            ],
            ["tools.toy.make_pickapic", "--out", str(out / "data"), "--pairs", "40", "--seed", "3"],
        ):
            subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=e, check=True, capture_output=True)
        digests[name] = (_digest(out / "model"), _rows_digest(out / "data"))
        assert os.path.getsize(out / "model" / "vae" / "diffusion_pytorch_model.safetensors") > 0
    first, second = digests.values()
    assert first[0] == second[0], "the tiny model differs between thread counts / vector kernels"
    assert first[1] == second[1], "the toy data differ between thread counts / vector kernels"
    trained = (tmp_path / "1_thread" / "model" / "vae" / "config.json").read_text()
    assert '"scaling_factor": 0.18215' not in trained  # the VAE was trained (its factor set from the latents)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_model_loads_in_its_pipeline_and_generates(family, tiny_sd15, tiny_sdxl):
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls, path = (
        (StableDiffusionPipeline, tiny_sd15) if family == "sd15" else (StableDiffusionXLPipeline, tiny_sdxl)
    )
    pipe = cls.from_pretrained(path)
    img = pipe(
        "a red cat", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert img.size == (64, 64)


def test_tokenizer_is_a_real_clip_bpe(tiny_sd15):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    assert tok.tokenize("a red castle") == ["a</w>", "red</w>", "castle</w>"]  # whole words of the vocabulary
    assert "".join(tok.tokenize("zebra")).replace("</w>", "") == "zebra"  # unknown words fall back to pieces
    ids = tok("a red castle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id
    vocab, merges = build_clip_bpe(["red"])
    assert merges == ["r e", "re d</w>"] and "red</w>" in vocab


def test_pickapic_schema_and_variety(tmp_path):
    rows = make_rows(300, seed=3, corrupt=1, truncated=1, empty=1, null_caption=1)
    paths = write_parquet(rows, tmp_path, rows_per_file=100)
    assert len(paths) == 3
    t = pq.read_table(paths[0])
    assert t.schema.equals(SCHEMA)
    labels = np.array([(r["label_0"], r["has_label"]) for r in rows], dtype=object)
    assert (labels[:, 0] == 0.5).sum() > 0 and (~labels[:, 1].astype(bool)).sum() > 0
    assert len({r["caption"] for r in rows}) < 300 and len({r["user_id"] for r in rows}) < 300
    import io

    from PIL import Image

    sizes = {Image.open(io.BytesIO(r["jpg_0"])).size for r in rows[:40] if r["jpg_0"]}
    assert len(sizes) > 5 and any(w != h for w, h in sizes)
    assert sum(r["caption"] is None for r in rows) == 1 and sum(r["jpg_0"] == b"" for r in rows) == 1
    # labels follow the toy world's truth when there is no annotator noise
    clean = [r for r in make_rows(100, seed=4) if r["has_label"] and r["label_0"] in (0.0, 1.0)]
    assert clean and all(r["label_0"] == r["true_label_0"] for r in clean)
    noisy = [
        r
        for r in make_rows(400, seed=4, annotator_noise=0.5)
        if r["has_label"] and r["label_0"] in (0.0, 1.0)
    ]
    assert 0.35 < np.mean([r["label_0"] != r["true_label_0"] for r in noisy]) < 0.65
    # the seed decides the images, and a row follows the world's rule by its decoded pixels: in row 5 of
    # seed 3, image 0 is the brighter one (median luma 189 against 114) and the truly better one
    five = make_rows(20, seed=3)[5]
    assert five["jpg_1"] != make_rows(20, seed=4)[5]["jpg_1"]
    assert five["true_label_0"] == five["label_0"] == 1.0 and _luma(five["jpg_0"]) > _luma(five["jpg_1"]) + 10


def test_the_command_lines_run(tmp_path):
    """The tools as a user runs them: every flag reaches the code. The rows the command writes equal
    make_rows called with the same values; changing one flag changes what it controls."""
    from tools.toy import make_pickapic
    from tools.toy.make_pickapic import make_rows

    def cli(name, *flags):
        assert (
            make_pickapic.main(["--out", str(tmp_path / name), "--pairs", "12", "--seed", "4", *flags]) == 0
        )
        return pq.read_table(next((tmp_path / name).glob("*.parquet"))).to_pylist()

    args = dict(min_size=40, max_size=48, tie_rate=0.0, unlabelled_rate=0.0, identical_rate=0.0)
    flags = "--min-size 40 --max-size 48 --tie-rate 0 --unlabelled-rate 0 --identical-rate 0".split()
    colour = cli(
        "c", *flags, "--world", "colour", "--annotator-noise", "0.5", "--corrupt", "1", "--null-caption", "1"
    )
    want = make_rows(12, 4, **args, world="colour", annotator_noise=0.5, corrupt=1, null_caption=1)
    assert colour == want
    bright = cli("b", *flags, "--world", "brightness")
    assert bright == make_rows(12, 4, **args, world="brightness")
    # and each flag changes what it controls
    assert bright != make_rows(12, 4, **args, world="colour")
    quiet = make_rows(12, 4, **args, world="colour", corrupt=1, null_caption=1)
    assert [r["label_0"] for r in colour] != [r["label_0"] for r in quiet]
    assert [r["jpg_1"] for r in colour] != [
        r["jpg_1"] for r in make_rows(12, 4, **args, world="colour", null_caption=1, annotator_noise=0.5)
    ]
    assert sum(r["caption"] is None for r in colour) == 1 and sum(r["caption"] is None for r in bright) == 0


def _pixels(jpg: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float64)


def _luma(jpg: bytes) -> float:
    """Median luminance: the background's, whatever the shape of another colour."""
    return float(np.median(_pixels(jpg) @ np.array([0.299, 0.587, 0.114])))


def _saturation(jpg: bytes) -> float:
    """Median HSV saturation, (max - min) / max, over the pixels."""
    px = _pixels(jpg)
    return float(np.median((px.max(-1) - px.min(-1)) / np.maximum(px.max(-1), 1.0)))


def _agreement(rows, measure, margin: float, cue=None) -> tuple[float, float]:
    """How often image 0's measure being higher (lower where ``cue(row)`` is False) matches
    true_label_0: over all rows, and over rows whose decoded measures differ by more than ``margin``
    (near-equal pairs are graded and JPEG moves them)."""
    d = np.array([measure(r["jpg_0"]) - measure(r["jpg_1"]) for r in rows])
    want = np.array([True if cue is None else cue(r) for r in rows])
    ok = ((d > 0) == want) == np.array([r["true_label_0"] == 1.0 for r in rows])
    return float(ok.mean()), float(ok[np.abs(d) > margin].mean())


_CLEAN = dict(tie_rate=0.0, unlabelled_rate=0.0, identical_rate=0.0, min_size=48, max_size=64)


def test_saturation_world_prefers_the_more_saturated_image_whatever_its_brightness():
    rows = make_rows(160, seed=6, world="saturation", **_CLEAN)
    overall, clear = _agreement(rows, _saturation, 0.1)
    assert overall >= 0.85 and clear >= 0.95  # with the rule inverted: 1 minus these
    # brightness carries no signal: the brighter image wins about half the time
    assert 0.35 < _agreement(rows, _luma, 0.0)[0] < 0.65
    assert all(r["label_0"] == r["true_label_0"] for r in rows)


def _warmth(jpg: bytes) -> float:
    """Median of R - B over the pixels."""
    px = _pixels(jpg)
    return float(np.median(px[..., 0] - px[..., 2]))


def test_warmth_world_prefers_the_redder_image_whatever_its_brightness():
    rows = make_rows(160, seed=8, world="warmth", **_CLEAN)
    overall, clear = _agreement(rows, _warmth, 20.0)
    assert overall >= 0.85 and clear >= 0.95
    assert 0.35 < _agreement(rows, _luma, 0.0)[0] < 0.65
    assert 0.35 < _agreement(rows, _saturation, 0.0)[0] < 0.65


def _green(jpg: bytes) -> float:
    """Median of G - (R + B) / 2 over the pixels."""
    px = _pixels(jpg)
    return float(np.median(px[..., 1] - (px[..., 0] + px[..., 2]) / 2))


def test_green_world_prefers_the_greener_image_whatever_its_brightness_or_warmth():
    rows = make_rows(160, seed=9, world="green", **_CLEAN)
    overall, clear = _agreement(rows, _green, 20.0)
    assert overall >= 0.85 and clear >= 0.95
    assert 0.35 < _agreement(rows, _luma, 0.0)[0] < 0.65
    assert 0.3 < _agreement(rows, _warmth, 0.0)[0] < 0.7


def test_daynight_world_follows_the_captions_cue():
    rows = make_rows(160, seed=7, world="daynight", **_CLEAN)
    day = [r for r in rows if "in the day" in r["caption"]]
    night = [r for r in rows if "at night" in r["caption"]]
    assert len(day) + len(night) == len(rows) and len(day) > 40 and len(night) > 40
    assert all("bright" in r["caption"] for r in day) and all("dark" in r["caption"] for r in night)
    overall, clear = _agreement(rows, _luma, 10.0, cue=lambda r: "in the day" in r["caption"])
    assert overall >= 0.9 and clear >= 0.95
    # the cue matters: brighter wins by day, darker at night, so brightness alone is near chance
    assert _agreement(day, _luma, 10.0)[1] >= 0.95 and _agreement(night, _luma, 10.0)[1] <= 0.05
    assert 0.35 < _agreement(rows, _luma, 0.0)[0] < 0.65
    # every caption word is a word of the tiny tokenizer
    from tools.toy.vocabulary import WORDS

    assert {w for r in rows for w in r["caption"].replace(",", "").split()} <= set(WORDS)


def test_pairs_per_user_sets_the_number_of_annotators():
    few = {r["user_id"] for r in make_rows(120, seed=1, pairs_per_user=30, **_CLEAN)}
    many = {r["user_id"] for r in make_rows(120, seed=1, pairs_per_user=2, **_CLEAN)}
    assert few == {1000, 1001, 1002, 1003}
    assert 40 <= len(many) <= 60 and max(many) < 1060
    assert len({r["user_id"] for r in make_rows(120, seed=1, **_CLEAN)}) <= 20  # default: pairs // 6


@pytest.mark.parametrize(
    "world, rule, measure, margin",
    [("brightness", "saturation", _saturation, 0.1), ("warmth", "brightness", _luma, 10.0)],
)
def test_taste_minority_labels_by_its_own_rule(world, rule, measure, margin):
    from tools.toy.make_pickapic import annotators

    kw = dict(world=world, pairs_per_user=10, minority_share=0.3, minority_rule=rule)
    rows = make_rows(400, seed=2, **_CLEAN, **kw)
    groups = {a["user_id"]: a for a in annotators(400, seed=2, **kw)["annotators"]}
    assert sorted(groups) == list(range(1000, 1040))
    assert sum(a["group"] == "minority" for a in groups.values()) == 12  # 30 % of 40 annotators
    assert all(a["rule"] == (rule if a["group"] == "minority" else world) for a in groups.values())
    minority = [r for r in rows if groups[r["user_id"]]["group"] == "minority"]
    majority = [r for r in rows if groups[r["user_id"]]["group"] == "majority"]
    assert 60 < len(minority) < 180
    # the majority labels by the truth; the minority by its own rule, independent of the truth
    assert all(r["label_0"] == r["true_label_0"] for r in majority)
    by_rule = [dict(r, true_label_0=r["label_0"]) for r in minority]
    assert _agreement(by_rule, measure, margin)[1] >= 0.9
    assert 0.35 < np.mean([r["label_0"] == r["true_label_0"] for r in minority]) < 0.65


def test_taste_minority_changes_labels_only_and_is_listed_beside_the_data(tmp_path):
    import json

    from pipeline.data.pickapic import list_sources
    from tools.toy import make_pickapic
    from tools.toy.make_pickapic import annotators

    # with a brightness minority in the saturation world, the images, truth and annotators are those
    # of the world without one
    kw = dict(world="saturation", pairs_per_user=10)
    plain = make_rows(60, seed=2, **_CLEAN, **kw)
    mixed = make_rows(60, seed=2, **_CLEAN, **kw, minority_share=0.5, minority_rule="brightness")
    assert [(r["jpg_1"], r["true_label_0"], r["user_id"]) for r in plain] == [
        (r["jpg_1"], r["true_label_0"], r["user_id"]) for r in mixed
    ]
    assert [r["label_0"] for r in plain] != [r["label_0"] for r in mixed]
    # the command line: the same rows as make_rows, and annotators.json beside the parquet files,
    # which the encode stage does not list
    out = tmp_path / "data"
    flags = "--world daynight --pairs-per-user 4 --minority-share 0.25 --minority-rule warmth".split()
    assert make_pickapic.main(["--out", str(out), "--pairs", "40", "--seed", "2", *flags]) == 0
    kw = dict(world="daynight", pairs_per_user=4, minority_share=0.25, minority_rule="warmth")
    assert pq.read_table(next(out.glob("*.parquet"))).to_pylist() == make_rows(40, 2, **kw)
    info = json.loads((out / "annotators.json").read_text())
    assert info == annotators(40, 2, **kw) and len(info["annotators"]) == 10
    assert [a["user_id"] for a in info["annotators"] if a["group"] == "minority"] == sorted(
        a["user_id"] for a in info["annotators"] if a["rule"] == "warmth"
    )
    assert sum(a["group"] == "minority" for a in info["annotators"]) == 3  # 0.25 x 10, rounded half up
    assert [p.suffix for p in list_sources(str(out))] == [".parquet"]
    with pytest.raises(ValueError, match="minority_rule"):
        make_rows(10, world="brightness", minority_share=0.2, minority_rule="brightness")
    with pytest.raises(SystemExit):
        make_pickapic.main(["--out", str(tmp_path / "x"), "--pairs", "10", "--minority-share", "0.2"])


def test_a_heavy_tail_of_annotators_changes_who_labels_not_the_images():
    """make_rows(user_tail=sigma): log-normal label counts (many annotators with a handful, a few with
    hundreds) over the same images and truth; annotators.json records the tail; a bad sigma is refused."""
    from tools.toy.make_pickapic import annotators

    plain = make_rows(3000, seed=100, pairs_per_user=30, **_CLEAN)
    tail = make_rows(3000, seed=100, pairs_per_user=30, user_tail=1.5, **_CLEAN)
    assert [(r["jpg_0"], r["true_label_0"], r["label_0"]) for r in plain] == [
        (r["jpg_0"], r["true_label_0"], r["label_0"]) for r in tail
    ]
    count = lambda rows: np.bincount([r["user_id"] - 1000 for r in rows], minlength=100)  # noqa: E731
    flat, heavy = count(plain), count(tail)
    assert flat.max() < 60 and flat.min() > 10  # binomial around 30
    assert heavy.max() > 300 and np.median(heavy) < 20 and (heavy <= 10).mean() > 0.3
    assert annotators(3000, 100, pairs_per_user=30, user_tail=1.5)["user_tail"] == 1.5
    assert "user_tail" not in annotators(3000, 100, pairs_per_user=30)  # earlier studies' files unchanged
    with pytest.raises(ValueError, match="user_tail"):
        make_rows(10, user_tail=-1)


def test_default_rows_are_unchanged():
    """Digests of make_rows' output computed with the code before the new worlds and flags."""

    def digest(rows) -> str:
        h = hashlib.sha256()
        for r in rows:
            for k in sorted(r):
                h.update(k.encode() + repr(r[k]).encode())
        return h.hexdigest()

    assert digest(make_rows(60, seed=5)) == "28921a791b795da8c18a51bebc45e61aee1407c32e4f243a5556285bd0f7efe4"
    colour = make_rows(
        40, seed=2, world="colour", annotator_noise=0.2, corrupt=1, truncated=1, empty=1, null_caption=1
    )
    assert digest(colour) == "80c3ab26a58d0b3cb5041b60a1af3416dd911736acb07eba290337ef8ca16681"
