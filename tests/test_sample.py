"""The sample stage (D3PO, part 1) end to end on the tiny SD1.5: the trajectory format, log-probs that
re-score exactly, job-layout independence, kill + restart, bad prompts, and sampling from a trained UNet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.d3po import trajectories
from pipeline.d3po.ddim import cfg_noise_pred, ddim_step_with_logprob
from pipeline.d3po.sampler import make_scheduler
from pipeline.data.prompts import read_prompt_source
from pipeline.data.shards import sha256_file
from pipeline.evaluate.generate import read_prompts
from stages.sample import cli_main

ROOT = Path(__file__).resolve().parents[1]
GOOD = [
    "a cozy red cat, watercolor",
    "a giant blue castle, photo",
    "a tiny green robot, pixel",
    "a bright yellow flower, painting",
    "a dark purple city, render",
    "a cozy red cat, watercolor",  # a repeated line is its own prompt (its own index, noise and key)
    "an old white ship, sketch",
]
TOO_LONG = " ".join(["red cat"] * 60)  # ~120 tokens
# line: 0 1 2 [3 empty] 4 [5 too long] 6 [7 whitespace] 8 9
LINES = [*GOOD[:3], "", GOOD[3], TOO_LONG, GOOD[4], "   ", *GOOD[5:]]
SHARD_SIZE, BATCH = 3, 2  # 7 groups -> shards of 3, 3, 1; two groups per UNet call


def sample_args(model, prompts, out, *extra):
    return [
        "--config",
        "configs/sample/tiny.yaml",
        f"model.path={model}",
        f"prompts.source={prompts}",
        f"output.dir={out}",
        f"output.shard_size={SHARD_SIZE}",
        f"run.batch_size={BATCH}",
        *extra,
    ]


def _outputs(d: Path) -> dict[str, bytes]:
    """Every output file but the logs and the jobs' resolved configs."""
    return {p.name: p.read_bytes() for p in sorted([*d.glob("shard-*"), d / "uncond.npy", d / "plan.json"])}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(LINES) + "\n")
    return p


@pytest.fixture(scope="module")
def sampled(tiny_sd15, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "one_job"
    assert cli_main(sample_args(tiny_sd15, prompt_file, out)) == 0
    return out


def test_format_shapes_counts_and_shared_initial_noise(sampled, tiny_sd15):
    m = trajectories.read_manifest(sampled)
    groups = list(trajectories.read_groups(sampled, verify=True, decode_images=True))
    k, n = 2, 4
    c = m["counts"]
    assert c == {
        "prompts_read": 10,
        "groups": 7,
        "images": 14,
        "pairs": 7,
        "skipped": {"empty_prompt": 2, "prompt_too_long": 1},
    }
    assert m["skipped_prompt_indices"] == {"empty_prompt": [3, 7], "prompt_too_long": [5]}
    assert [s["count"] for s in m["shards"]] == [3, 3, 1] and len(groups) == 7
    assert m["format"] == "d3po-trajectories" and m["version"] == 1
    assert (
        m["model"]["family"] == "sd15" and m["model"]["unet"]["kind"] == "base" and m["model"]["config_hash"]
    )
    assert m["sampler"]["steps"] == n and m["sampler"]["eta"] == 1.0 and m["sampler"]["guidance"] == 5.0
    assert m["sampler"]["scheduler"]["set_alpha_to_one"] is False
    assert m["shapes"]["latents"] == [k, n + 1, 4, 8, 8]
    assert m["uncond"]["sha256"] == sha256_file(sampled / "uncond.npy")
    assert m["bytes_per_pair"] == m["shard_bytes"] / 7 == sum(s["bytes"] for s in m["shards"]) / 7
    uncond = trajectories.load_uncond(sampled, 32)
    assert uncond.shape == (1, 77, 32) and uncond.dtype == np.float16

    from pipeline.encoders import Encoder
    from pipeline.models import inspect_model

    enc = Encoder(inspect_model(str(tiny_sd15)), torch.device("cpu"), torch.float32, torch.float32)
    kept = [i for i in range(len(LINES)) if i not in (3, 5, 7)]
    for g, i in zip(groups, kept):
        assert g["latents"].dtype == np.float16 and g["latents"].shape == (k, n + 1, 4, 8, 8)
        assert g["log_probs"].dtype == np.float32 and g["log_probs"].shape == (k, n)
        assert np.isfinite(g["log_probs"]).all()
        assert g["timesteps"].dtype == np.int64 and g["timesteps"].tolist() == m["sampler"]["timesteps"]
        assert g["txt"].dtype == np.float16 and g["txt"].shape == (77, 32)
        assert g["images"].shape == (k, 64, 64, 3) and g["images"].dtype == np.uint8
        meta = g["meta"]
        assert meta["prompt"] == LINES[i] and meta["prompt_index"] == i
        assert g["key"] == trajectories.group_key(i, LINES[i]) and meta["images"] == [
            f"{g['key']}/0",
            f"{g['key']}/1",
        ]
        assert meta["seed"] == trajectories.group_seed(0, i) and meta["sampler"]["images_per_prompt"] == k
        # D3PO's design: the K images share x_T and part ways from the first step on
        assert (g["latents"][0, 0] == g["latents"][1, 0]).all()
        assert not (g["latents"][0, 1:] == g["latents"][1, 1:]).all(axis=(1, 2, 3)).any()
        np.testing.assert_array_equal(g["txt"], enc.encode_text([LINES[i]])[0][0].numpy().astype(np.float16))
    # the repeated prompt (lines 0 and 8) is two groups with their own keys and noise
    assert groups[0]["key"] != groups[-2]["key"]
    assert not (groups[0]["latents"][0, 0] == groups[-2]["latents"][0, 0]).all()
    assert len({g["key"] for g in groups}) == 7


def test_stored_log_probs_rescore_exactly(sampled, tiny_sd15):
    """Each stored transition, re-scored with the same UNet in the sampler's batch layout, gives the
    stored log-prob bit for bit (a policy/reference ratio of exactly 1 at step 0 of training)."""
    from pipeline.models import load_unet

    unet = load_unet(str(tiny_sd15)).eval()
    sched = make_scheduler(str(tiny_sd15), 4)
    uncond = torch.from_numpy(trajectories.load_uncond(sampled))
    groups = list(trajectories.read_groups(sampled))
    batches, start = [], 0
    for size in (3, 3, 1):  # the shards; the stage batches groups within a shard
        batches += [groups[b : min(b + BATCH, start + size)] for b in range(start, start + size, BATCH)]
        start += size
    checked = 0
    with torch.no_grad():
        for batch in batches:
            lat = torch.from_numpy(np.concatenate([g["latents"] for g in batch]))  # [bK, N+1, ...]
            stored = torch.from_numpy(np.concatenate([g["log_probs"] for g in batch]))
            text = torch.from_numpy(np.stack([g["txt"] for g in batch])).float().repeat_interleave(2, 0)
            for n, t in enumerate(batch[0]["timesteps"].tolist()):
                x_t = lat[:, n]
                eps = cfg_noise_pred(unet, x_t.float(), t, text, uncond.float(), 5.0)
                _, lp = ddim_step_with_logprob(sched, eps, t, x_t, 1.0, prev_sample=lat[:, n + 1])
                assert torch.equal(lp, stored[:, n]), (n, lp, stored[:, n])
                checked += lp.numel()
                # a transition that was not sampled from x_t scores differently
                _, other = ddim_step_with_logprob(sched, eps, t, x_t, 1.0, prev_sample=lat.flip(0)[:, n + 1])
                assert not torch.equal(other, stored[:, n])
    assert checked == 7 * 2 * 4


def test_two_jobs_write_the_same_bytes_as_one(sampled, tiny_sd15, prompt_file, tmp_path):
    out = tmp_path / "two_jobs"
    assert cli_main(sample_args(tiny_sd15, prompt_file, out, "dist.rank=1", "dist.world_size=2")) == 0
    assert not (out / "manifest.json").exists() and len(list(out.glob("shard-*.tar"))) == 1
    assert cli_main(sample_args(tiny_sd15, prompt_file, out, "dist.rank=0", "dist.world_size=2")) == 0
    assert _outputs(out) == _outputs(sampled)
    assert (out / "manifest.json").read_text() == (sampled / "manifest.json").read_text()


@pytest.mark.slow
def test_killed_job_restarts_to_the_same_bytes(sampled, tiny_sd15, prompt_file, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, KILL_AT_TAR="2", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [
        sys.executable,
        "-m",
        "tests.helpers.stage_killed",
        "sample",
        *sample_args(tiny_sd15, prompt_file, out),
    ]
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert len(list(out.glob("shard-*.tar"))) == 1 and list(
        out.glob(".shard-000001.*tmp*")
    )  # one done, one partial
    assert not (out / "manifest.json").exists()
    env.pop("KILL_AT_TAR")
    p = subprocess.run(
        [sys.executable, "-m", "stages.sample", *sample_args(tiny_sd15, prompt_file, out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 already finished, 2 to sample; removed 1 stale temporaries" in p.stderr
    assert not [f for f in out.iterdir() if "tmp" in f.name]
    assert _outputs(out) == _outputs(sampled)
    assert (out / "manifest.json").read_text() == (sampled / "manifest.json").read_text()


def test_every_line_of_a_prompt_file_is_a_prompt_and_empty_ones_are_skipped(prompt_file):
    """The one rule prompt files are read by: line i is prompt i, blank lines included (so a prompt's
    index, seed and key do not move when a blank line is removed elsewhere); the sample stage screens
    the empty ones out and counts them, the evaluation leaves them out."""
    prompts = read_prompt_source(str(prompt_file))
    assert prompts.prompts == [line.strip() for line in LINES] and prompts.rows_read == len(LINES)
    assert prompts.prompts[3] == prompts.prompts[7] == ""
    assert read_prompts(str(prompt_file), 100) == [line.strip() for line in LINES if line.strip()]
    assert read_prompts(str(prompt_file), 2) == GOOD[:2]


def test_parquet_captions_and_bad_prompt_sources(tiny_sd15, tmp_path, capsys):
    src = tmp_path / "pickapic"
    src.mkdir()
    caps = [
        "a red cat, photo",
        None,
        "a red cat, photo",
        "a blue dog, sketch",
        "",
        TOO_LONG,
        "a blue dog, sketch",
    ]
    pq.write_table(pa.table({"caption": caps, "label_0": [1.0] * len(caps)}), src / "part-0.parquet")
    out = tmp_path / "pq"
    assert cli_main(sample_args(tiny_sd15, src, out)) == 0
    m = trajectories.read_manifest(out)
    # distinct captions in first-occurrence order: cat, "" (null and empty), dog, too long
    assert m["counts"]["prompts_read"] == 4 and m["counts"]["groups"] == 2
    assert m["counts"]["skipped"] == {"empty_prompt": 1, "prompt_too_long": 1}
    assert m["source"]["rows_read"] == 7 and m["source"]["kind"] == "parquet"
    assert [g["meta"]["prompt"] for g in trajectories.read_groups(out)] == [
        "a red cat, photo",
        "a blue dog, sketch",
    ]
    capsys.readouterr()

    assert cli_main(sample_args(tiny_sd15, tmp_path / "no_such_prompts.txt", tmp_path / "o")) == 2
    assert "prompts.source=" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text(f"\n  \n{TOO_LONG}\n")
    assert cli_main(sample_args(tiny_sd15, bad, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "no usable prompt in 3" in line and "prompt_too_long" in line
    assert (
        cli_main(sample_args(tiny_sd15, bad, tmp_path / "o", "sampler.eta=0", "sampler.images_per_prompt=1"))
        == 2
    )
    err = capsys.readouterr().err
    assert "sampler.eta: must be in (0, 1], got 0" in err
    assert "sampler.images_per_prompt: must be in [2, 8], got 1" in err
    assert (
        cli_main(sample_args(tiny_sd15, prompt_file_with(tmp_path), tmp_path / "o", f"model.unet={tmp_path}"))
        == 2
    )
    assert "model.unet=" in capsys.readouterr().err and not list((tmp_path / "o").glob("shard-*"))


def prompt_file_with(d: Path) -> Path:
    p = d / "ok.txt"
    p.write_text(GOOD[0] + "\n")
    return p


def test_another_run_into_the_same_folder_is_refused(sampled, tiny_sd15, prompt_file, capsys):
    assert cli_main(sample_args(tiny_sd15, prompt_file, sampled, "sampler.guidance=3")) == 2
    err = capsys.readouterr().err
    assert "holds trajectories of another sample run" in err and "sampler.guidance" in err


def test_sdxl_is_refused_with_one_line(tiny_sdxl, prompt_file, tmp_path, capsys):
    assert cli_main(sample_args(tiny_sdxl, prompt_file, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "a sdxl model" in line and "SD1.5 trajectories only" in line


def test_sampling_from_an_exported_unet_and_a_run_folder(sampled, tiny_sd15, prompt_file, tmp_path):
    """model.unet takes what unet_specs resolves: a run folder means its export/unet."""
    from pipeline.models import load_unet

    unet = load_unet(str(tiny_sd15))
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(1.05)  # a "trained" UNet: another noise prediction
    run = tmp_path / "run"
    unet.save_pretrained(run / "export" / "unet")
    via_run, via_folder = tmp_path / "via_run", tmp_path / "via_folder"
    assert cli_main(sample_args(tiny_sd15, prompt_file, via_run, f"model.unet={run}", "prompts.max=4")) == 0
    unet_dir = run / "export" / "unet"
    assert (
        cli_main(sample_args(tiny_sd15, prompt_file, via_folder, f"model.unet={unet_dir}", "prompts.max=4"))
        == 0
    )
    m = trajectories.read_manifest(via_run)
    assert m["model"]["unet"] == {"kind": "unet", "path": str(unet_dir.resolve())}
    assert m["counts"]["prompts_read"] == 4 and m["counts"]["groups"] == 3
    shards = sorted(p.name for p in via_run.glob("shard-*.tar"))
    assert all((via_run / s).read_bytes() == (via_folder / s).read_bytes() for s in shards)
    base = {g["key"]: g for g in trajectories.read_groups(sampled)}
    for g in trajectories.read_groups(via_run):
        b = base[g["key"]]  # same prompt, same index: same key and same noise, another UNet
        assert (g["latents"][:, 0] == b["latents"][:, 0]).all()
        assert not (g["latents"][:, -1] == b["latents"][:, -1]).all()
    assert json.loads((via_run / "plan.json").read_text())["sample_config"]["model"]["unet"] == str(run)


def test_a_complete_folder_is_a_labelling_source_keyed_as_the_feedback_reads(sampled):
    """People label the sampled images in the labelling service (best of K, or pairs); their export's
    image keys are the trajectory json's ``KEY/j``, which the feedback stage matches."""
    from pipeline.d3po.trajectories import read_groups
    from pipeline.label.sources import load_source

    groups = {g["key"]: g for g in read_groups(sampled)}
    src = load_source(str(sampled), mode="pair", shuffle=False)
    assert len(src.items) == sum(len(g["jpegs"]) * (len(g["jpegs"]) - 1) // 2 for g in groups.values())
    for item in src.items:
        for image_key, ref in zip(item.images, item.refs):
            key, j = image_key.split("/")
            assert (
                image_key in groups[key]["meta"]["images"] and item.caption == groups[key]["meta"]["prompt"]
            )
            assert Path(ref["file"]).read_bytes() == groups[key]["jpegs"][int(j)]
    assert len(load_source(str(sampled)).items) == len(groups)  # best of K by default: one item a prompt


def _decode_stored(model, groups: list[dict], chunk: int) -> list[bytes]:
    """The groups' final latents x_0 decoded as the sampler documents it, ``chunk`` images per VAE call
    (never across a sampler call: the groups given), rounded to uint8 and JPEG-encoded at quality 95."""
    from pipeline.models import inspect_model, load_vae

    info = inspect_model(str(model))
    vae = load_vae(info, torch.float32, torch.device("cpu"))
    x0 = torch.from_numpy(np.concatenate([g["latents"][:, -1] for g in groups]))
    out = []
    with torch.no_grad():
        for i in range(0, len(x0), chunk):
            img = vae.decode(x0[i : i + chunk].float() / info.scaling_factor).sample.float()
            px = ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            out += [trajectories.jpeg_bytes(a, 95) for a in px]
    return out


def _sampler_calls(groups: list[dict]) -> list[list[dict]]:
    """The stage's sampler calls: BATCH groups at a time within each shard (3, 3, 1 groups)."""
    calls, start = [], 0
    for size in (3, 3, 1):
        calls += [groups[b : min(b + BATCH, start + size)] for b in range(start, start + size, BATCH)]
        start += size
    return calls


def test_each_image_is_decoded_from_its_own_x0_alone(sampled, tiny_sd15):
    """run.decode_batch=1 (the default): every stored JPEG is its own x_0 decoded by itself, so an image's
    pixels depend neither on the groups that shared its UNet call nor on the decode chunking."""
    groups = list(trajectories.read_groups(sampled))
    want = _decode_stored(tiny_sd15, groups, 1)
    assert [j for g in groups for j in g["jpegs"]] == want


def test_decode_batch_chunks_the_vae_calls_and_changes_nothing_else(
    sampled, tiny_sd15, prompt_file, tmp_path
):
    """run.decode_batch=3 over calls of 2 groups x K=2 = 4 images: chunks of 3 and 1 images, crossing the
    groups' edge. The plan (decode_batch is how, not what), the latents, log-probs, embeddings and
    metadata are the default's byte for byte; each image is the documented chunked decode. (The pixels
    themselves may differ from the default's by float rounding: oneDNN's convolutions pick their
    kernels by batch size, so the same latent decoded alone or beside others can round differently.)"""
    out = tmp_path / "decode3"
    assert cli_main(sample_args(tiny_sd15, prompt_file, out, "run.decode_batch=3")) == 0
    assert (out / "plan.json").read_bytes() == (sampled / "plan.json").read_bytes()
    a, b = list(trajectories.read_groups(sampled)), list(trajectories.read_groups(out))
    assert [g["key"] for g in a] == [g["key"] for g in b]
    for ga, gb in zip(a, b):
        for k in ("latents", "log_probs", "timesteps", "txt"):
            assert np.array_equal(ga[k], gb[k]), k
        assert ga["meta"] == gb["meta"]
    stored = [j for g in b for j in g["jpegs"]]
    assert stored == [j for call in _sampler_calls(b) for j in _decode_stored(tiny_sd15, call, 3)]
    rec = json.loads(next(out.glob("shard-*.json")).read_text())
    assert rec["decode_batch"] == 3 and rec["batch_size"] == BATCH
