"""The encode stage end to end on the tiny models: shard format, equality with a direct VAE encode,
job-layout independence, kill + restart, bad rows and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from pipeline.data import pickapic
from pipeline.data.images import prepare
from pipeline.data.shards import decode_sample, tar_member_names
from pipeline.data.text_store import TextStore
from stages.encode import cli_main
from tests.conftest import encode_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoded(tiny_sd15, pickapic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "one_job"
    assert cli_main(encode_args(tiny_sd15, pickapic_dir, out)) == 0
    return out


def _tars(d: Path) -> dict[str, bytes]:
    """Every output file but the logs: shard tars and text files."""
    return {p.name: p.read_bytes() for p in sorted([*d.glob("shard-*.tar"), *d.glob("text-*.npy")])}


def test_shards_round_trip_through_webdataset(encoded, tiny_sd15):
    manifest = json.loads((encoded / "manifest.json").read_text())
    urls = [str(encoded / s["name"]) for s in manifest["shards"]]
    assert not [n for u in urls for n in tar_member_names(Path(u)) if n.endswith(".txt.npy")]
    texts = TextStore(encoded, manifest)
    ds = wds.WebDataset(urls, shardshuffle=False).map(lambda raw: decode_sample(raw, texts))
    samples = list(ds)
    assert len(samples) == manifest["counts"]["pairs"] == sum(s["count"] for s in manifest["shards"])
    s = samples[0]
    assert {"__key__", "lat_w", "lat_l", "txt", "meta"} <= set(s) and "pooled" not in s and "std_w" not in s
    # each distinct caption's embedding is stored once, and a pair's reference finds its own caption's
    by_caption = {}
    for x in samples:
        by_caption.setdefault(x["meta"]["caption"], []).append(x)
    assert manifest["counts"]["captions"] == sum(
        len(np.load(encoded / t["name"])) for t in manifest["text_files"]
    )
    assert manifest["counts"]["captions"] >= len(by_caption) and len(by_caption) < len(samples)
    for xs in by_caption.values():
        assert len({tuple(x["meta"]["text"]) for x in xs}) == 1 and all(
            (x["txt"] == xs[0]["txt"]).all() for x in xs
        )
    from pipeline.encoders import Encoder
    from pipeline.models import inspect_model

    enc = Encoder(inspect_model(str(tiny_sd15)), torch.device("cpu"), torch.float32, torch.float32)
    for caption in list(by_caption)[:3]:
        direct = enc.encode_text([caption])[0][0].numpy().astype(np.float16)
        np.testing.assert_array_equal(by_caption[caption][0]["txt"], direct)
    assert s["lat_w"].dtype == np.float16 and s["lat_w"].shape == (4, 8, 8)
    assert s["lat_l"].shape == (4, 8, 8) and s["txt"].dtype == np.float16 and s["txt"].shape == (77, 32)
    assert {
        "caption",
        "ranking_id",
        "user_id",
        "image_uids",
        "winner",
        "original_size_w",
        "crop_top_left_l",
    } <= set(s["meta"])
    assert len({x["__key__"] for x in samples}) == len(samples)
    # counts add up: every row is kept or skipped for a named reason
    c = manifest["counts"]
    assert c["pairs"] + sum(c["skipped"].values()) == c["rows_read"] == 120
    assert (
        c["skipped"]["corrupt_image"] == 2
        and c["skipped"]["empty_image"] == 1
        and c["skipped"]["null_caption"] == 1
    )
    assert c["skipped"]["tie"] > 0 and c["skipped"]["unlabelled"] > 0
    assert len(manifest["skipped_ranking_ids"]["corrupt_image"]) == 2
    assert manifest["model"]["family"] == "sd15" and manifest["latent_shape"] == [4, 8, 8]
    assert (encoded / "jobs" / "job-00000-of-00001.yaml").is_file()


def test_latents_equal_a_direct_vae_encode(encoded, tiny_sd15, pickapic_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae").eval()
    files = pickapic.list_sources(str(pickapic_dir))
    rows = {r["ranking_id"]: r for f in files for r in pq.read_table(f).to_pylist()}
    ds = wds.WebDataset(str(encoded / "shard-000001.tar"), shardshuffle=False).map(decode_sample)
    for s in list(ds)[:3]:
        row = rows[s["meta"]["ranking_id"]]
        w = s["meta"]["winner"]
        assert row[f"label_{w}"] == 1.0
        for name, img in (("lat_w", row[f"jpg_{w}"]), ("lat_l", row[f"jpg_{1 - w}"])):
            pix = torch.from_numpy(prepare(img, 64).pixels)[None]
            with torch.no_grad():
                direct = vae.encode(pix).latent_dist.mean[0] * vae.config.scaling_factor
            torch.testing.assert_close(torch.from_numpy(s[name]).float(), direct, atol=2e-3, rtol=2e-3)


def test_two_jobs_write_the_same_shards_as_one(encoded, tiny_sd15, pickapic_dir, tmp_path):
    out = tmp_path / "two_jobs"
    assert cli_main(encode_args(tiny_sd15, pickapic_dir, out, "dist.rank=1", "dist.world_size=2")) == 0
    assert not (out / "manifest.json").exists()  # job 0's shards are missing yet
    env_backup = dict(os.environ)
    try:  # job 0 takes its layout from the launcher's environment, as under torchrun / SLURM
        os.environ.update(RANK="0", WORLD_SIZE="2")
        assert cli_main(encode_args(tiny_sd15, pickapic_dir, out)) == 0
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    assert _tars(out) == _tars(encoded)
    assert (out / "manifest.json").read_text() == (encoded / "manifest.json").read_text()


def test_killed_job_restarts_to_the_same_result(encoded, tiny_sd15, pickapic_dir, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, KILL_AT_TAR="2", PYTHONPATH=str(ROOT))
    args = [
        sys.executable,
        "-m",
        "tests.helpers.stage_killed",
        "encode",
        *encode_args(tiny_sd15, pickapic_dir, out),
    ]
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert len(list(out.glob("shard-*.tar"))) == 1 and list(
        out.glob(".shard-000001.*tmp*")
    )  # one done, one partial
    assert not (out / "manifest.json").exists()
    p = subprocess.run([sys.executable, "-m", "stages.encode", *encode_args(tiny_sd15, pickapic_dir, out)],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 already finished" in p.stderr
    assert not [f for f in out.iterdir() if "tmp" in f.name]
    assert _tars(out) == _tars(encoded)
    assert (out / "manifest.json").read_text() == (encoded / "manifest.json").read_text()


def test_missing_column_is_a_clear_error(tiny_sd15, tmp_path, capsys):
    import pyarrow.parquet as pq

    from tools.make_pickapic import make_rows, write_parquet

    src = tmp_path / "src"
    write_parquet(make_rows(4, seed=0), src, rows_per_file=10)
    f = next(src.glob("*.parquet"))
    pq.write_table(pq.read_table(f).drop(["label_1"]), f)
    assert cli_main(encode_args(tiny_sd15, src, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert f"{f}: missing column(s) label_1" in err


def test_unknown_key_and_bad_model_folder_exit_2(tiny_sd15, pickapic_dir, tmp_path, capsys):
    assert cli_main(encode_args(tiny_sd15, pickapic_dir, tmp_path / "o", "output.shard_sise=3")) == 2
    assert "output.shard_sise: unknown key (did you mean 'shard_size'?)" in capsys.readouterr().err
    (tmp_path / "notamodel").mkdir()
    assert cli_main(encode_args(tmp_path / "notamodel", pickapic_dir, tmp_path / "o")) == 2
    assert "not a diffusers model folder (no model_index.json" in capsys.readouterr().err
    assert cli_main(encode_args(tiny_sd15, tmp_path / "nothing_here", tmp_path / "o")) == 2
    assert "no parquet files found" in capsys.readouterr().err


def test_another_model_into_the_same_output_is_refused(encoded, tiny_sdxl, pickapic_dir, capsys):
    assert cli_main(encode_args(tiny_sdxl, pickapic_dir, encoded)) == 2
    err = capsys.readouterr().err
    assert "holds shards of another encode run" in err and "model.family" in err


def test_sdxl_encodes_pooled_and_size_ids(tiny_sdxl, pickapic_dir, tmp_path):
    out = tmp_path / "xl"
    assert cli_main(encode_args(tiny_sdxl, pickapic_dir, out, "output.store_std=true")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["family"] == "sdxl" and m["text_shape"] == [77, 64] and m["pooled_dim"] == 32
    texts = TextStore(out, m)
    s = next(
        iter(
            wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).map(
                lambda r: decode_sample(r, texts)
            )
        )
    )
    assert s["txt"].shape == (77, 64) and s["pooled"].shape == (32,) and s["std_w"].shape == (4, 8, 8)
    h, w = s["meta"]["original_size_w"]
    top, left = s["meta"]["crop_top_left_w"]
    assert min(h, w) >= 64 and (top == 0 or left == 0)


def test_real_pickapic_input_without_the_toy_column_encodes_with_the_tiny_config(tiny_sd15, tmp_path):
    """true_label_0 exists only in the toy worlds: the tiny config copies it where present, null elsewhere."""
    from tools.make_pickapic import make_rows, write_parquet

    src = tmp_path / "src"
    write_parquet(
        make_rows(8, seed=2, tie_rate=0, unlabelled_rate=0, identical_rate=0), src, rows_per_file=10
    )
    f = next(src.glob("*.parquet"))
    pq.write_table(pq.read_table(f).drop(["true_label_0"]), f)
    out = tmp_path / "o"
    assert cli_main(encode_args(tiny_sd15, src, out)) == 0
    s = next(iter(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).map(decode_sample)))
    assert s["meta"]["extra"] == {"true_label_0": None}
