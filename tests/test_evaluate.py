"""The evaluate stage on tiny models: preference accuracy against a direct computation, seeded
generation, each scorer on a tiny stand-in, the minority and per-annotator report, the HPSv2
converter, and the robustness benchmark end to end at smoke size."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.evaluate.minority_report import run_report
from pipeline.metrics_log import read_metrics
from pipeline.minority import auroc
from stages.evaluate import cli_main
from tests.helpers.run import ROOT, env


@pytest.fixture(scope="module")
def perturbed_unet(tiny_sd15, tmp_path_factory):
    """A "trained" UNet: the tiny one with every weight nudged (a seeded perturbation)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("perturbed") / "unet"
    unet.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def scorers_dir(tmp_path_factory):
    from tools.toy.make_tiny_scorers import make_tiny_scorers

    return make_tiny_scorers(tmp_path_factory.mktemp("scorers"))


def _direct_margins(model_dir, base_dir, shards, draws, seed, batch_size):
    """h = d_ref - d_model per pair, averaged over draws, written out independently of the library:
    z_t = sqrt(abar) z + sqrt(1 - abar) eps with the scheduler's abar, eps-prediction MSE per image."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pipeline.data.shards import decode_sample, iter_tar_samples, load_manifest
    from pipeline.data.text_store import TextStore
    from pipeline.losses.diffusion import step_seed

    m = load_manifest(shards)
    texts = TextStore(shards, m)
    samples = [decode_sample(r, texts) for s in m["shards"] for r in iter_tar_samples(shards / s["name"])]
    pol = UNet2DConditionModel.from_pretrained(model_dir).eval()
    ref = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet").eval()
    abar = DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler").alphas_cumprod
    out = []
    for bi in range(0, len(samples), batch_size):
        chunk = samples[bi : bi + batch_size]
        n = len(chunk)
        z = torch.from_numpy(np.stack([s["lat_w"] for s in chunk] + [s["lat_l"] for s in chunk])).float()
        txt = torch.from_numpy(np.stack([s["txt"] for s in chunk])).float().repeat(2, 1, 1)
        acc = torch.zeros(n)
        for d in range(draws):
            g = torch.Generator().manual_seed(step_seed(seed, 0, bi * draws + d))
            eps = torch.randn((n, *z.shape[1:]), generator=g).repeat(2, 1, 1, 1)
            t = torch.randint(0, 1000, (n,), generator=g).repeat(2)
            a = abar[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z + (1 - a).sqrt() * eps
            with torch.no_grad():
                e_ref = (ref(zt, t, encoder_hidden_states=txt).sample - eps).pow(2).mean(dim=(1, 2, 3))
                e_pol = (pol(zt, t, encoder_hidden_states=txt).sample - eps).pow(2).mean(dim=(1, 2, 3))
            acc += (e_ref[:n] - e_ref[n:]) - (e_pol[:n] - e_pol[n:])
        out.append(acc / draws)
    return torch.cat(out).numpy()


def test_preference_accuracy_equals_a_direct_computation(tiny_sd15, shards16, perturbed_unet, tmp_path):
    out = tmp_path / "report"
    rc = cli_main(
        [
            "--config",
            "configs/eval/tiny.yaml",
            f"output={out}",
            f"models.unets.p={perturbed_unet}",
            f"preference.shards={shards16}",
            "preference.draws=3",
            "preference.batch_size=5",
        ]
    )
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())["preference"]["models"]["p"]
    h = _direct_margins(perturbed_unet, tiny_sd15, shards16, draws=3, seed=1234, batch_size=5)
    direct = float(np.mean((h > 0) + 0.5 * (h == 0)))
    assert rep["accuracy_labels"]["mean"] == pytest.approx(direct, abs=1e-12)
    assert rep["mean_h"] == pytest.approx(float(h.mean()), rel=1e-4, abs=1e-9)
    assert rep["accuracy_labels"]["n"] == 16
    # the toy world's labels agree with the truth, so both accuracies coincide
    assert rep["accuracy_true"]["mean"] == rep["accuracy_labels"]["mean"]
    assert "| p |" in (out / "report.md").read_text() and (out / "metrics.png").is_file()


def test_the_audit_scores_every_training_pair_with_the_final_policy(
    tiny_sd15, shards64, perturbed_unet, tmp_path
):
    """minority.audit_draws > 0: the report scores the run's 64 training pairs (4 shards, streamed) with
    its exported UNet against the reference, in manifest order, with the run's flips applied as the
    trainer applied them; each pair's h equals the direct computation, negated where the pair was
    flipped, and is written beside the report (audit_NAME.parquet) and read by the audit."""
    from pipeline.data.flips import flipped_mask
    from pipeline.evaluate.preference import iter_pairs

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "unet").symlink_to(perturbed_unet)
    (run / "config.yaml").write_text(
        f"data:\n  shards: {shards64}\n  flip_rate: 0.5\n  flip_seed: 3\n  flip_by: pair\n"
        f"model:\n  path: {tiny_sd15}\nobjective:\n  beta: 1000.0\n"
    )
    keys = [s["__key__"] for s in iter_pairs(shards64)]
    users = [s["meta"]["user_id"] for s in iter_pairs(shards64)]
    (run / "pairs" / "rank_00000").mkdir(parents=True)
    pq.write_table(  # the records from training (their h is not what the audit reads)
        pa.table(
            {
                "step": [1] * 64,
                "key": keys,
                "user_id": users,
                "flipped": [False] * 64,
                "true_agrees": [1.0] * 64,
                "h": [0.0] * 64,
            }
        ),
        run / "pairs" / "rank_00000" / "upto_00000001.parquet",
    )
    out = tmp_path / "report"
    args = ["--config", "configs/eval/tiny.yaml", f"output={out}", f"minority.runs.r={run}"]
    assert cli_main([*args, "minority.audit_draws=3", "minority.audit_batch_size=12"]) == 0
    rep = json.loads((out / "report.json").read_text())["minority"]["r"]
    assert rep["audit_margins"] == "final" and rep["flip_rate_source"] == "posthoc_final"
    final = pq.read_table(rep["audit_pairs_file"]).to_pydict()
    flipped = flipped_mask(keys, 3, 0.5)
    assert final["key"] == keys and final["user_id"] == users and 10 < flipped.sum() < 54
    assert final["flipped"] == flipped.tolist()
    direct = _direct_margins(perturbed_unet, tiny_sd15, shards64, draws=3, seed=1234, batch_size=12)
    want = np.where(flipped, -direct, direct)
    np.testing.assert_allclose(final["h"], want, rtol=1e-4, atol=1e-7)
    assert rep["auroc_neg_h_final"] == pytest.approx(auroc(-want, flipped), abs=1e-9)
    for a in rep["annotators"]:
        mine = np.array(final["user_id"]) == a["user_id"]
        assert a["policy_disagrees"] == pytest.approx(float(np.mean(want[mine] < 0)), abs=1e-12)
    assert "final policy's margins on every training pair" in (out / "report.md").read_text()
    # audit_draws=0: the records' h, as before
    assert cli_main([*args, "minority.audit_draws=0", f"output={tmp_path / 'r0'}"]) == 0
    rep0 = json.loads((tmp_path / "r0" / "report.json").read_text())["minority"]["r"]
    assert rep0["audit_margins"] == "records" and "auroc_neg_h_final" not in rep0
    # the training shards are not on this machine: the report says so and reads the records
    cfg = (run / "config.yaml").read_text().replace(str(shards64), str(tmp_path / "gone"))
    (run / "config.yaml").write_text(cfg)
    assert cli_main([*args, "minority.audit_draws=1", f"output={tmp_path / 'r1'}"]) == 0
    rep1 = json.loads((tmp_path / "r1" / "report.json").read_text())["minority"]["r"]
    assert rep1["audit_margins"] == "records" and "no manifest" in rep1["audit_note"]
    assert str(tmp_path / "gone") in rep1["audit_note"]


def test_generation_is_seeded_and_reproducible(tiny_sd15, perturbed_unet, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue house\n\na green tree\n")
    args = [
        "--config",
        "configs/eval/tiny.yaml",
        f"models.base={tiny_sd15}",
        f"models.unets.p={perturbed_unet}",
        f"generation.prompts={prompts}",
        "generation.steps=2",
    ]
    assert cli_main([*args, f"output={tmp_path / 'a'}"]) == 0
    assert cli_main([*args, f"output={tmp_path / 'b'}"]) == 0
    assert cli_main([*args, f"output={tmp_path / 'c'}", "generation.seed=7"]) == 0
    a = sorted((tmp_path / "a" / "images").rglob("*.png"))
    assert len(a) == 6  # 3 prompts (blank lines skipped) x (base + p)
    for f in a:
        rel = f.relative_to(tmp_path / "a")
        assert f.read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert any(f.read_bytes() != (tmp_path / "c" / f.relative_to(tmp_path / "a")).read_bytes() for f in a)
    assert (tmp_path / "a" / "grid.png").is_file()
    # base and the perturbed model differ on the same seed
    assert (tmp_path / "a/images/base/00000.png").read_bytes() != (
        tmp_path / "a/images/p/00000.png"
    ).read_bytes()


def test_each_scorer_runs_on_a_tiny_stand_in(scorers_dir, tiny_sd15, perturbed_unet, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    from pipeline.evaluate.scorers import build_scorers
    from pipeline.schema.evaluate import EvalScorers

    cfg = EvalScorers(**{k: str(scorers_dir / k) for k in ("pickscore", "hpsv2", "aesthetic", "imagereward")})
    scorers, notes = build_scorers(cfg, torch.device("cpu"), torch.float32)
    assert [s.name for s in scorers] == ["pickscore", "hpsv2", "aesthetic", "imagereward"] and notes == []
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a red cat", "a blue house", "a tiny green robot"]
    for s in scorers:
        v = s.score(imgs, prompts)
        assert v.shape == (3,) and np.isfinite(v).all(), s.name
    # PickScore by hand: logit_scale.exp() * cos(image, text) with the same CLIP
    m = CLIPModel.from_pretrained(scorers_dir / "pickscore").eval()
    proc = AutoProcessor.from_pretrained(scorers_dir / "pickscore")
    with torch.no_grad():
        px = proc(images=imgs, return_tensors="pt")["pixel_values"]
        tx = proc(text=prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        i = m.vision_model(pixel_values=px).pooler_output @ m.visual_projection.weight.T
        t = (
            m.text_model(input_ids=tx["input_ids"], attention_mask=tx["attention_mask"]).pooler_output
            @ m.text_projection.weight.T
        )
        want = m.logit_scale.exp() * torch.nn.functional.cosine_similarity(i, t)
    np.testing.assert_allclose(scorers[0].score(imgs, prompts), want.numpy(), rtol=1e-5, atol=1e-5)
    # through the stage: a scorer without a path is skipped with a note, never faked
    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text("a red cat\na blue house\n")
    out = tmp_path / "r"
    assert (
        cli_main(
            [
                "--config",
                "configs/eval/tiny.yaml",
                f"output={out}",
                f"models.base={tiny_sd15}",
                f"models.unets.p={perturbed_unet}",
                f"generation.prompts={prompts_file}",
                "generation.steps=2",
                f"scorers.pickscore={scorers_dir / 'pickscore'}",
            ]
        )
        == 0
    )
    md = (out / "report.md").read_text()
    assert "pickscore" in md and "hpsv2: skipped (scorers.hpsv2 not given)" in md
    gen = json.loads((out / "report.json").read_text())["generation"]["models"]
    assert set(gen) == {"base", "p"} and gen["p"]["pickscore"]["n"] == 2


def test_minority_report_ranks_flipped_pairs_and_annotators(tmp_path):
    """Synthetic records: users 0-2 had every label flipped, u is higher on flipped pairs (with noise)."""
    rng = np.random.default_rng(0)
    n = 600
    users = rng.integers(0, 12, n)
    flipped = users < 3
    u = np.abs(rng.normal(0, 1, n)) + 1.5 * flipped
    h = rng.normal(0, 1, n) - 1.0 * flipped
    keys = [f"k{i}" for i in range(n)]
    run = tmp_path / "run"
    (run / "pairs" / "rank_00000").mkdir(parents=True)
    # an earlier epoch's records of the same pairs, with meaningless u: the report must use the latest
    early = pa.table(
        {
            "step": [1] * n,
            "key": keys,
            "user_id": users.tolist(),
            "flipped": flipped.tolist(),
            "true_agrees": [1.0] * n,
            "h": rng.normal(0, 1, n).tolist(),
            "u": rng.random(n).tolist(),
            "W": [1.0] * n,
        }
    )
    late = pa.table(
        {
            "step": [9] * n,
            "key": keys,
            "user_id": users.tolist(),
            "flipped": flipped.tolist(),
            "true_agrees": [1.0] * n,
            "h": h.tolist(),
            "u": u.tolist(),
            "W": (1 / (1 + u)).tolist(),
        }
    )
    pq.write_table(early, run / "pairs" / "rank_00000" / "upto_00000005.parquet")
    pq.write_table(late, run / "pairs" / "rank_00000" / "upto_00000010.parquet")
    (run / "config.yaml").write_text("data:\n  flip_rate: 0.25\n  flip_by: pair\n")
    r = run_report(run, tmp_path, "synthetic", bins=5, high_q=0.8, min_pairs=5, last_epochs=1)
    assert "auroc_annotators" not in r  # pair-level flips: an annotator's flipped share is chance
    (run / "config.yaml").write_text("data:\n  flip_rate: 0.25\n  flip_by: user\n")
    r = run_report(run, tmp_path, "synthetic", bins=5, high_q=0.8, min_pairs=5, last_epochs=1)
    assert r["pairs"] == n and r["flipped"] == int(flipped.sum())
    assert r["auroc_u"] == pytest.approx(auroc(u, flipped))
    assert r["auroc_neg_h"] == pytest.approx(auroc(-h, flipped))
    shares = [b["flipped_share"] for b in r["flipped_share_by_u_bin"]]
    assert shares[-1] > shares[0] and shares[-1] > 0.5
    assert {a["user_id"] for a in r["annotators"][:3]} == {0, 1, 2}
    assert r["auroc_annotators"] == 1.0
    assert r["mean_W_flipped"] < r["mean_W_clean"]
    assert (tmp_path / "minority_synthetic.png").is_file()
    sft = tmp_path / "sft_run"
    (sft / "pairs" / "rank_00000").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {"step": [1], "key": ["k"], "user_id": [1], "flipped": [True], "true_agrees": [1.0], "e_w": [0.1]}
        ),
        sft / "pairs" / "rank_00000" / "upto_00000001.parquet",
    )
    assert "no preference margin" in run_report(sft, tmp_path, "sft", 5, 0.8, 5, 1)["note"]


def test_report_names_the_annotators_a_run_without_rates_disagrees_with(tmp_path):
    """A Robust-DPO run logs h only: the report's audit line names the annotators whose pairs the
    policy most contradicts (users 0-2: every label flipped, h mostly negative), with that share,
    ranked by the label-flip model fitted to beta h after training (each annotator's rate shrunk toward
    the global one): user 99, one label that the policy contradicts more than any other, is not
    ranked above annotators with 40 such labels (by mean -h it would come first)."""
    rng = np.random.default_rng(1)
    n = 480
    users = np.append(rng.integers(0, 12, n - 1), 99)
    flipped = users < 3
    h = rng.normal(0.5, 0.5, n) - 1.5 * flipped
    h[-1] = -4.0
    assert np.argmax([-h[users == u].mean() for u in np.unique(users)]) == len(np.unique(users)) - 1
    run = tmp_path / "run"
    (run / "pairs" / "rank_00000").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "step": [3] * n,
                "key": [f"k{i}" for i in range(n)],
                "user_id": users.tolist(),
                "flipped": flipped.tolist(),
                "true_agrees": [1.0] * n,
                "h": h.tolist(),
            }
        ),
        run / "pairs" / "rank_00000" / "upto_00000003.parquet",
    )
    (run / "config.yaml").write_text("data:\n  flip_rate: 0.25\n  flip_by: user\nobjective:\n  beta: 2.0\n")
    out = tmp_path / "report"
    assert (
        cli_main(["--config", "configs/eval/tiny.yaml", f"output={out}", f"minority.runs.guess={run}"]) == 0
    )
    guess = json.loads((out / "report.json").read_text())["minority"]["guess"]
    assert guess["flip_rate_source"] == "posthoc"
    rates = {a["user_id"]: a["estimated_flip_rate"] for a in guess["annotators"]}
    assert min(rates[u] for u in (0, 1, 2)) > 0.5 > rates[99] > max(rates[u] for u in range(3, 12))
    line = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith("minority (guess)"))
    assert "(fitted to the margins from training)" in line
    listed = line.split("share of them the policy contradicts): ")[1].split("), ")
    assert {int(x.split(" ")[0]) for x in listed[:3]} == {0, 1, 2}
    first = int(listed[0].split(" ")[0])
    share = float(listed[0].split("contradicts ")[1].rstrip(")").split(")")[0])
    assert share == pytest.approx(float(np.mean(h[users == first] < 0)), abs=0.005)
    assert f"{(users == first).sum()} pairs" in listed[0]
    assert "AUROC over annotators 1.000" in line


def test_minority_report_ranks_annotators_by_em_dpos_estimated_rates(tmp_path):
    """An em_dpo run logs u (the posterior of a flip) and no W, and its checkpoint holds a flip rate per
    annotator: the audit ranks by those rates (users 0-2 flipped: the highest), not by mean u."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(1)
    n = 400
    users = rng.integers(0, 10, n)
    flipped = users < 3
    run = tmp_path / "em"
    (run / "pairs" / "rank_00000").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "step": [1] * n,
                "key": [f"k{i}" for i in range(n)],
                "user_id": users.tolist(),
                "flipped": flipped.tolist(),
                "true_agrees": [1.0] * n,
                "h": rng.normal(0, 1, n).tolist(),
                "u": rng.random(n).tolist(),
            }
        ),
        run / "pairs" / "rank_00000" / "upto_00000001.parquet",
    )
    (run / "config.yaml").write_text("data:\n  flip_rate: 0.3\n  flip_by: user\n")
    ck = run / "checkpoints" / "step_00000001"
    ck.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000001\n")
    rates = [0.9, 0.8, 0.7] + [0.05 + 0.01 * i for i in range(7)]
    save_file(
        {
            "users": torch.arange(10),
            "user_rate": torch.tensor(rates, dtype=torch.float64),
            "scalars": torch.tensor([0.27, 0.02, 400.0], dtype=torch.float64),
        },
        str(ck / "objective.safetensors"),
    )
    r = run_report(run, tmp_path, "em", bins=5, high_q=0.8, min_pairs=5, last_epochs=1)
    assert "mean_W_flipped" not in r and r["estimated_flip_rate"] == pytest.approx(0.27)
    assert [a["user_id"] for a in r["annotators"][:3]] == [0, 1, 2]
    assert r["annotators"][0]["estimated_flip_rate"] == pytest.approx(0.9)
    assert r["auroc_annotators"] == 1.0  # by the rates; mean u is noise here


def test_hpsv2_converter_round_trips_an_open_clip_state_dict(scorers_dir, tmp_path):
    """A tiny CLIPModel written in open_clip's layout (fused qkv, transposed projections) converts
    back to the same model: identical image and text features."""
    from transformers import CLIPModel

    from tools.convert_openclip import convert

    hf = CLIPModel.from_pretrained(scorers_dir / "hpsv2").eval()
    s = hf.state_dict()
    oc = {
        "visual.conv1.weight": s["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": s["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": s["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": s["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": s["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": s["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": s["vision_model.post_layernorm.bias"],
        "visual.proj": s["visual_projection.weight"].t(),
        "token_embedding.weight": s["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": s["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": s["text_model.final_layer_norm.weight"],
        "ln_final.bias": s["text_model.final_layer_norm.bias"],
        "text_projection": s["text_projection.weight"].t(),
        "logit_scale": s["logit_scale"],
    }
    for tower, src in (
        ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
        ("transformer.resblocks.", "text_model.encoder.layers."),
    ):
        for i in range(2):
            a, b = f"{src}{i}.", f"{tower}{i}."
            oc[b + "attn.in_proj_weight"] = torch.cat([s[a + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            oc[b + "attn.in_proj_bias"] = torch.cat([s[a + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            for x, y in {
                "attn.out_proj": "self_attn.out_proj",
                "ln_1": "layer_norm1",
                "ln_2": "layer_norm2",
                "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2",
            }.items():
                oc[b + x + ".weight"], oc[b + x + ".bias"] = s[a + y + ".weight"], s[a + y + ".bias"]
    torch.save({"state_dict": {f"module.{k}": v.clone() for k, v in oc.items()}}, tmp_path / "hps.pt")
    out = convert(
        str(tmp_path / "hps.pt"),
        str(scorers_dir / "hpsv2"),
        str(tmp_path / "hf"),
        vision_heads=4,
        text_heads=4,
        act="quick_gelu",
    )
    conv = CLIPModel.from_pretrained(out).eval()
    conv_sd = conv.state_dict()
    for k, v in s.items():
        assert torch.equal(conv_sd[k], v), k
    x, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 77))
    with torch.no_grad():
        for fn, arg in (
            ("get_image_features", {"pixel_values": x}),
            ("get_text_features", {"input_ids": ids}),
        ):
            want, got = getattr(hf, fn)(**arg), getattr(conv, fn)(**arg)
            want, got = getattr(want, "pooler_output", want), getattr(got, "pooler_output", got)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_robustness_benchmark_smoke(tiny_sd15, tmp_path):
    """The minority preset's machinery at smoke size: annotator flips, a control whose lr comes from
    another run's mean W, accuracy at intermediate checkpoints, per-run AUROCs (pair flips are the
    trainer's, tested in test_train_lib; one flip setting keeps this at four trainings)."""
    out = tmp_path / "rb"
    out.mkdir()
    (out / "model").symlink_to(tiny_sd15)  # the session's tiny model, not a new one with a trained VAE
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.robustness",
            "--preset",
            "minority",
            "--out",
            str(out),
            "--pairs",
            "48",
            "--heldout",
            "16",
            "--steps",
            "4",
            "--micro-batch",
            "4",
            "--seeds",
            "0",
            "--flips",
            "user:0.5",
            "--variants",
            "dpo",
            "adaptive_dpo",
            "dpo_lr_meanW",
            "sft",
            "--draws",
            "1",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())["table"]
    assert set(res) == {f"{v}@user:0.5" for v in ("dpo", "adaptive_dpo", "dpo_lr_meanW", "sft")}
    assert all(0 <= r["accuracy_mean"] <= 1 and r["seeds"] == 1 for r in res.values())
    assert list(res["dpo@user:0.5"]["curve"]) == ["1", "2", "3", "4"]
    assert "auroc_u" in res["adaptive_dpo@user:0.5"] and "auroc_annotators" in res["adaptive_dpo@user:0.5"]
    assert "auroc_annotators" not in res["sft@user:0.5"]  # SFT has no margin to rank annotators by
    cfg = (out / "runs" / "dpo_lr_meanW_user50_s0" / "config.yaml").read_text()
    assert "lr: 0.0001\n" not in cfg  # scaled by the adaptive run's mean W
    assert (out / "accuracy_vs_steps.png").is_file() and "| adaptive_dpo |" in (out / "table.md").read_text()


@pytest.mark.slow
def test_noise_study_smoke(tiny_sd15, tmp_path):
    """tools.noise_study at smoke size: a held-out world must be held out; then one world, annotators
    flipped, DPO against EM-DPO: accuracy against the truth, minus-DPO paired by seed, EM-DPO's
    estimated rate from its checkpoint and the AUROC over annotators, the table and the plot."""
    from tools.studies import noise_study

    with pytest.raises(SystemExit, match="also in --worlds"):
        noise_study.main(["--out", str(tmp_path / "x"), "--worlds", "brightness", "--heldout", "brightness"])
    out = tmp_path / "ns"
    out.mkdir()
    (out / "model").symlink_to(tiny_sd15)  # the session's tiny model, not a new one
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.noise_study",
            "--out",
            str(out),
            "--worlds",
            "brightness",
            "--heldout",
            "none",
            "--structures",
            "user:0.5",
            "--variants",
            "dpo",
            "em_dpo",
            "--seeds",
            "0",
            "--data-seeds",
            "0",
            "1",
            "--pairs",
            "64",
            "--heldout-pairs",
            "16",
            "--pairs-per-user",
            "4",
            "--steps",
            "4",
            "--micro-batch",
            "8",
            "--draws",
            "1",
            "--name",
            "_smoke",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((out / "results_smoke.json").read_text())
    run = res["runs"]["brightness/em_dpo_user50_s0"]
    # read from the checkpoint: still EM's starting rate, as 32 pairs are inside its 512-pair warm-up
    assert 0 <= run["accuracy_true"] <= 1 and run["estimated_rate"] == pytest.approx(0.1)
    assert run["annotator_score"] == "eps_user" and 0 <= run["auroc_annotators"] <= 1
    # the report's audit by the final policy: every training pair scored again, flipped as trained
    assert 0 <= run["auroc_annotators_final_shrunk"] <= 1
    final = pq.read_table(out / "brightness/runs/em_dpo_user50_s0/audit_final_d2.parquet").to_pydict()
    from pipeline.evaluate.minority_report import latest_per_pair
    from pipeline.metrics_log import read_pair_records

    rec = latest_per_pair(read_pair_records(out / "brightness/runs/em_dpo_user50_s0"))
    trained = dict(zip(rec["key"], rec["flipped"]))
    seen = [(trained[k], f) for k, f in zip(final["key"], final["flipped"]) if k in trained]
    assert len(final["key"]) == 64 and len(seen) == len(trained) >= 16 and all(a == b for a, b in seen)
    # about half the annotators flipped: the share of labels against the truth is near 0.5
    assert 0.2 < run["noisy_share"] < 0.8
    row = res["table"]["brightness|user:0.5|em_dpo"]
    # a second data seed is another training set of the world (other pairs), paired with its own DPO run
    other = res["runs"]["brightness/em_dpo_user50_d1_s0"]
    assert other["data_seed"] == 1 and row["accuracy_true"]["n"] == 2
    first = (
        pq.read_table(sorted((out / "data/brightness/data/train").glob("*.parquet"))[0])
        .column("caption")
        .to_pylist()
    )
    second = (
        pq.read_table(sorted((out / "data/brightness_d1/data/train").glob("*.parquet"))[0])
        .column("caption")
        .to_pylist()
    )
    assert first != second
    diffs = [
        res["runs"][f"brightness/em_dpo_user50_{t}"]["accuracy_true"]
        - res["runs"][f"brightness/dpo_user50_{t}"]["accuracy_true"]
        for t in ("s0", "d1_s0")
    ]
    assert row["minus_dpo"]["mean"] == pytest.approx(np.mean(diffs))
    assert "em_dpo" in (out / "table_smoke.md").read_text() and (out / "accuracy_smoke.png").is_file()


@pytest.fixture(scope="module")
def sd15_with_checker(tiny_sd15, tmp_path_factory):
    """The tiny SD1.5 folder with a tiny safety checker that flags every image, as SD1.5's folders name
    one (``safety_checker``, ``feature_extractor``, ``requires_safety_checker: true``)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    cfg = CLIPConfig(
        text_config=dict(tower, vocab_size=99),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)  # cos - (-10) > 0: every image is "flagged"
    base = StableDiffusionPipeline.from_pretrained(
        tiny_sd15, safety_checker=None, requires_safety_checker=False
    )
    fe = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    parts = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor")}
    pipe = StableDiffusionPipeline(**parts, safety_checker=checker, feature_extractor=fe)
    out = tmp_path_factory.mktemp("with_checker") / "sd15"
    pipe.save_pretrained(out)
    return out


def test_generation_has_no_safety_checker(sd15_with_checker, tmp_path):
    """A folder that names a safety checker: diffusers' own pipeline loads it and it blacks out the
    flagged images; the stage's pipeline is built without it, so every image is the model's."""
    from diffusers import StableDiffusionPipeline

    direct = StableDiffusionPipeline.from_pretrained(sd15_with_checker)
    assert direct.safety_checker is not None
    img = direct(["a red cat"], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.asarray(img).max() == 0  # blacked out: what every score used to see
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue house\n")
    out = tmp_path / "r"
    assert (
        cli_main(
            [
                "--config",
                "configs/eval/tiny.yaml",
                f"output={out}",
                f"models.base={sd15_with_checker}",
                f"generation.prompts={prompts}",
                "generation.steps=2",
            ]
        )
        == 0
    )
    from PIL import Image

    pngs = sorted((out / "images" / "base").glob("*.png"))
    assert len(pngs) == 2 and all(np.asarray(Image.open(f)).max() > 0 for f in pngs)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_unet_on_the_device_per_model_and_images_unchanged(
    family, tiny_sd15, tiny_sdxl, tmp_path, monkeypatch
):
    """A spy on each generation call: the UNets alive that the stage made and that sit on the compute
    device are exactly one, the pipeline's; the VAE decodes image by image; no safety checker. The
    images equal a plain diffusers pipeline's with everything on the device (same seeds, batches and
    sliced decode): moving the UNets in and out changes no pixel."""
    import gc

    from diffusers import UNet2DConditionModel

    import pipeline.evaluate.run as ev

    model = tiny_sd15 if family == "sd15" else tiny_sdxl
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(1.05)
    unet.save_pretrained(tmp_path / "p" / "unet")
    del unet

    def unets_on(device) -> list:
        gc.collect()
        return [
            o
            for o in gc.get_objects()
            if isinstance(o, UNet2DConditionModel)
            and id(o) not in before
            and next(o.parameters()).device == device
        ]

    seen = []
    real = ev.generate

    def spy(pipe, *a, **k):
        seen.append(
            (len(unets_on(pipe.unet.device)), getattr(pipe, "safety_checker", None), pipe.vae.use_slicing)
        )
        return real(pipe, *a, **k)

    monkeypatch.setattr(ev, "generate", spy)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue house\na green tree\n")
    out = tmp_path / "r"
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, UNet2DConditionModel)}
    assert (
        cli_main(
            [
                "--config",
                "configs/eval/tiny.yaml",
                f"output={out}",
                f"models.base={model}",
                f"models.unets.p={tmp_path / 'p' / 'unet'}",
                f"generation.prompts={prompts}",
                "generation.steps=2",
                "generation.batch_size=2",
            ]
        )
        == 0
    )
    assert seen == [(1, None, True), (1, None, True)]
    assert unets_on(torch.device("cpu")) == []  # and none is left once the stage returns

    import diffusers
    from PIL import Image

    from pipeline.evaluate.generate import generate
    from pipeline.models import inspect_model

    cls = getattr(diffusers, inspect_model(model).family.pipeline_class)
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    pipe = cls.from_pretrained(model, **extra)
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    for name in ("base", "p"):
        if name == "p":
            pipe.unet = UNet2DConditionModel.from_pretrained(tmp_path / "p" / "unet")
        want = generate(pipe, ["a red cat", "a blue house", "a green tree"], 0, 2, 5.0, None, 2)
        got = [Image.open(f) for f in sorted((out / "images" / name).glob("*.png"))]
        assert [np.asarray(w).tobytes() for w in want] == [np.asarray(x).tobytes() for x in got], name


@pytest.mark.slow
def test_campaign_study_smoke(tiny_sd15, tmp_path):
    """tools.studies.campaign_study at smoke size: a campaign labelled over HTTP (heavy-tailed counts,
    flipped annotators, R = 2, check items), the export's flip-rate estimates scored against the truth,
    and DPO against Robust-DPO at the measured per-annotator rates trained on the export."""
    out = tmp_path / "cs"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.studies.campaign_study",
            "--out",
            str(out),
            "--model",
            str(tiny_sd15),
            "--pairs",
            "60",
            "--heldout",
            "16",
            "--annotators",
            "12",
            "--checks",
            "4",
            "--data-seeds",
            "0",
            "--train-seeds",
            "0",
            "--variants",
            "dpo",
            "robust_flip_rates",
            "--steps",
            "2",
            "--micro-batch",
            "8",
            "--draws",
            "1",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    c = res["campaigns"]["0"]
    assert c["labels"] >= 2 * 60 and 0.1 < c["wrong_label_share"] < 0.7  # R = 2, ~40 % flipped + slips
    assert c["flipped_annotators"] >= 1 and 0 <= c["auroc_flipped_annotators"] <= 1
    assert set(res["accuracy_true"]) == {"dpo", "robust_flip_rates"}
    m = read_metrics(out / "runs" / "robust_flip_rates_d0_s0" / "metrics.jsonl")
    assert len(m) == 2 and 0 <= m[-1]["eps_pair"] <= 1  # the measured rates reached the loss
    assert "robust_flip_rates" in (out / "table.md").read_text()


def test_two_studies_evaluating_in_one_folder_keep_each_others_cache_entries(tmp_path):
    """tools.studies' evaluation cache (OUT/WORLD/eval_cache.json) is shared by every study run with the same
    --out: a write adds its entries to what is on disk now (not to what the process read at its start) and
    replaces the file by a rename, so a second study neither loses the first's entries nor reads half a file."""
    from tools.studies.robustness import _merge_cache

    path = tmp_path / "eval_cache.json"
    _merge_cache(path, {"dpo_none_s0": {"accuracy_true": 0.8}})
    # another study, started before the first wrote
    _merge_cache(path, {"em_dpo_none_s0": {"accuracy_true": 0.83}})
    _merge_cache(path, {"dpo_none_s0": {"accuracy_true": 0.8, "mean_h": 0.1}})
    assert json.loads(path.read_text()) == {
        "dpo_none_s0": {"accuracy_true": 0.8, "mean_h": 0.1},
        "em_dpo_none_s0": {"accuracy_true": 0.83},
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_cache.json", "eval_cache.lock"]
