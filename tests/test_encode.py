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


@pytest.mark.slow
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
    p = subprocess.run(
        [sys.executable, "-m", "stages.encode", *encode_args(tiny_sd15, pickapic_dir, out)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 already finished" in p.stderr
    assert not [f for f in out.iterdir() if "tmp" in f.name]
    assert _tars(out) == _tars(encoded)
    assert (out / "manifest.json").read_text() == (encoded / "manifest.json").read_text()


def test_missing_column_is_a_clear_error(tiny_sd15, tmp_path, capsys):
    import pyarrow.parquet as pq

    from tools.toy.make_pickapic import make_rows, write_parquet

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
    from tools.toy.make_pickapic import make_rows, write_parquet

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


def _raw_samples(d: Path) -> dict[str, dict]:
    """key -> raw sample (member suffix -> bytes) over every shard of an output folder."""
    from pipeline.data.shards import iter_tar_samples

    out = {}
    for tar in sorted(d.glob("shard-*.tar")):
        for raw in iter_tar_samples(tar):
            out[raw["__key__"]] = {k: v for k, v in raw.items() if not k.startswith("__")}
    return out


@pytest.mark.parametrize("threads,resolution,pairs", [(1, 64, 20), (2, 256, 5)])
def test_vae_sub_batches_do_not_change_a_bit(tiny_sd15, tmp_path, threads, resolution, pairs):
    """fp32 latents, the same bytes whatever run.vae_batch: one image per VAE call, 3 (ending with a
    lone image) and the whole batch in one. Each measure in pipeline/encoders.py is needed by one of
    these cases (checked by removing it): per-image CPU convolutions (1 thread: 1x1 filters take oneDNN
    from 16 images on), a lone image beside a copy (2 threads: one image takes a multi-threaded GEMM),
    contiguous attention output (2 threads, 256 px: the channels-last GroupNorm that follows splits its
    sums over the threads by batch)."""
    from tools.toy.make_pickapic import make_rows, write_parquet

    src = tmp_path / "src"
    write_parquet(
        make_rows(pairs, seed=8, tie_rate=0, unlabelled_rate=0, identical_rate=0), src, rows_per_file=20
    )
    outs = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for vb in (1, 3, 2 * pairs):
            outs.append(tmp_path / f"vb{vb}")
            args = encode_args(
                tiny_sd15,
                src,
                outs[-1],
                f"output.shard_size={pairs}",
                f"run.batch_size={pairs}",
                f"run.vae_batch={vb}",
                f"data.resolution={resolution}",
                "output.latent_dtype=fp32",
            )
            assert cli_main(args) == 0
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        assert _tars(out) == _tars(outs[0])
        assert (out / "manifest.json").read_text() == (outs[0] / "manifest.json").read_text()


def test_a_lone_image_gets_the_same_bits_as_in_a_batch(tiny_sd15, tmp_path):
    """On 2+ threads one image alone took a multi-threaded GEMM where a batch takes one thread per
    image, and its latents changed in the last bits (seen with a VAE wider than the tiny one's: 32-128
    channels): encode_images encodes a lone image beside a copy of itself."""
    import shutil

    from diffusers import AutoencoderKL

    from pipeline.encoders import Encoder
    from pipeline.models import inspect_model

    model = tmp_path / "wide"
    shutil.copytree(tiny_sd15, model)
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    ).save_pretrained(model / "vae")
    enc = Encoder(inspect_model(model), torch.device("cpu"), torch.float32, torch.float32)
    pix = torch.rand(3, 3, 64, 64) * 2 - 1
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole, whole_std = enc.encode_images(pix, with_std=True)
        for vb in (1, 2):  # 1 + 1 + 1 and 2 + 1
            mean, std = enc.encode_images(pix, with_std=True, vae_batch=vb)
            assert torch.equal(mean, whole) and torch.equal(std, whole_std)
    finally:
        torch.set_num_threads(before)


def test_sdxl_std_latents_do_not_depend_on_vae_batch(tiny_sdxl, tmp_path):
    from tools.toy.make_pickapic import make_rows, write_parquet

    src = tmp_path / "src"
    write_parquet(
        make_rows(12, seed=4, tie_rate=0, unlabelled_rate=0, identical_rate=0), src, rows_per_file=12
    )
    outs = [tmp_path / "vb1", tmp_path / "vb3"]
    for out, vb in zip(outs, (1, 3)):
        assert cli_main(encode_args(tiny_sdxl, src, out, "output.store_std=true", f"run.vae_batch={vb}")) == 0
    assert _tars(outs[0]) == _tars(outs[1])
    assert all("std_l.npy" in s for s in _raw_samples(outs[0]).values())


def test_fp16_vae_with_force_upcast_runs_in_fp32_with_one_warning(tiny_sdxl, tmp_path, caplog):
    """The tiny SDXL VAE's config says force_upcast, as the real one's (it overflows in fp16): an fp16
    request runs it in fp32, says so once, and writes what an fp32 run writes."""
    import logging
    import shutil

    from pipeline.encoders import Encoder
    from pipeline.models import inspect_model
    from tools.toy.make_pickapic import make_rows, write_parquet

    assert json.loads((tiny_sdxl / "vae" / "config.json").read_text())["force_upcast"] is True
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="pipeline.encoders"):
        enc16 = Encoder(inspect_model(tiny_sdxl), cpu, torch.float16, torch.float32)
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.encoders"]
    assert len(warnings) == 1 and "force_upcast" in warnings[0] and "sdxl-vae-fp16-fix" in warnings[0]
    assert enc16.vae_dtype == torch.float32
    assert {p.dtype for p in enc16.vae.parameters()} == {torch.float32}
    enc32 = Encoder(inspect_model(tiny_sdxl), cpu, torch.float32, torch.float32)
    pix = torch.rand(3, 3, 64, 64) * 2 - 1
    assert torch.equal(enc16.encode_images(pix)[0], enc32.encode_images(pix)[0])

    # a VAE fixed for fp16 (force_upcast false), or one whose config predates the key (SD1.5's), runs in fp16
    for name, edit in (
        ("fixed", lambda c: {**c, "force_upcast": False}),
        ("old", lambda c: {k: v for k, v in c.items() if k != "force_upcast"}),
    ):
        model = tmp_path / name
        shutil.copytree(tiny_sdxl, model)
        cfg_path = model / "vae" / "config.json"
        cfg_path.write_text(json.dumps(edit(json.loads(cfg_path.read_text()))))
        caplog.clear()
        enc = Encoder(inspect_model(model), cpu, torch.float16, torch.float32)
        assert enc.vae_dtype == torch.float16 and next(enc.vae.parameters()).dtype == torch.float16
        assert not [r for r in caplog.records if r.name == "pipeline.encoders"]

    # the stage: fp16 requested, the same shards as fp32
    src = tmp_path / "src"
    write_parquet(make_rows(6, seed=3, tie_rate=0, unlabelled_rate=0, identical_rate=0), src, rows_per_file=6)
    caplog.clear()
    assert cli_main(encode_args(tiny_sdxl, src, tmp_path / "fp16", "model.vae_dtype=fp16")) == 0
    assert len([r for r in caplog.records if "force_upcast" in r.getMessage()]) == 1
    assert cli_main(encode_args(tiny_sdxl, src, tmp_path / "fp32", "model.vae_dtype=fp32")) == 0
    assert _tars(tmp_path / "fp16") == _tars(tmp_path / "fp32")


def test_nonfinite_latents_are_skipped_and_counted(encoded, tiny_sd15, pickapic_dir, tmp_path, monkeypatch):
    """A VAE that gives NaN for one image (a loser) and, for another (a winner), values finite in fp32
    but beyond fp16's range (stored as inf): both pairs are skipped as nonfinite_latent, every
    other pair is written as in a clean run, and the counts add up."""
    import pipeline.encoders as encoders_mod
    from pipeline.data.shards import iter_tar_samples

    files = pickapic.list_sources(str(pickapic_dir))
    rows = {r["ranking_id"]: r for f in files for r in pq.read_table(f).to_pylist()}
    first = [decode_sample(r) for r in iter_tar_samples(encoded / "shard-000000.tar")]
    third = [decode_sample(r) for r in iter_tar_samples(encoded / "shard-000002.tar")]
    targets = []  # (ranking_id, pixels of the poisoned image, value)
    for s, which, value in ((first[2], "loser", float("nan")), (third[5], "winner", 1e30)):
        rid, w = s["meta"]["ranking_id"], s["meta"]["winner"]
        img = rows[rid][f"jpg_{w if which == 'winner' else 1 - w}"]
        targets.append((rid, torch.from_numpy(prepare(img, 64).pixels), value))

    def poison(module, args, output):
        for k, x in enumerate(args[0]):
            for _, px, value in targets:
                if torch.equal(x, px):
                    output[k] = value
        return output

    real_load_vae = encoders_mod.load_vae

    def load_vae(*a, **kw):
        vae = real_load_vae(*a, **kw)
        vae.encoder.register_forward_hook(poison)
        return vae

    monkeypatch.setattr(encoders_mod, "load_vae", load_vae)
    out = tmp_path / "o"
    assert cli_main(encode_args(tiny_sd15, pickapic_dir, out, "run.vae_batch=3")) == 0

    m = json.loads((out / "manifest.json").read_text())
    clean = json.loads((encoded / "manifest.json").read_text())
    c = m["counts"]
    assert c["skipped"]["nonfinite_latent"] == 2
    assert m["skipped_ranking_ids"]["nonfinite_latent"] == sorted(rid for rid, _, _ in targets)
    assert c["pairs"] == clean["counts"]["pairs"] - 2
    assert c["pairs"] + sum(c["skipped"].values()) == c["rows_read"] == clean["counts"]["rows_read"]
    recs = [json.loads((out / s["name"]).with_suffix(".json").read_text()) for s in m["shards"]]
    for rec in recs:  # per shard: pairs + skipped rows == the shard's rows
        assert rec["count"] + sum(rec["skipped"].values()) == rec["rows"][1] - rec["rows"][0]
    assert [r["skipped"].get("nonfinite_latent", 0) for r in recs] == [1, 0, 1] + [0] * (len(recs) - 3)
    assert recs[0]["skipped_ids"]["nonfinite_latent"] == [targets[0][0]]
    got, want = _raw_samples(out), _raw_samples(encoded)
    assert {x["__key__"] for x in (first[2], third[5])} == set(want) - set(got)
    assert all(got[k] == want[k] for k in got)  # every other pair: the same bytes
