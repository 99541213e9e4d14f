"""tools.make_tiny_model and tools.make_pickapic: offline-loadable, deterministic, Pick-a-Pic schema."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from tools.make_pickapic import SCHEMA, make_rows, write_parquet
from tools.make_tiny_model import build_clip_bpe, make_tiny_model


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
    assert make_rows(20, seed=3)[5]["jpg_1"] == make_rows(20, seed=3)[5]["jpg_1"]


def test_the_command_lines_run(tmp_path):
    """The tools as a user runs them: every flag reaches the code. The rows the command writes equal
    make_rows called with the same values; changing one flag changes what it controls."""
    from tools import make_pickapic
    from tools.make_pickapic import make_rows

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
