"""D3PO in the shared trainer (part 3): trajectories (stages.sample) + preferences (stages.feedback) ->
``stages.train`` with the trajectory workload (pipeline/train/trajectories.py).

8 prompts x K=2 images x 4 DDIM steps of the tiny model; brightness feedback decides all 8 pairs.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.metrics_log import read_metrics, read_pair_records
from tests.helpers.run import check, train

CONFIG = "configs/train/tiny_d3po.yaml"
PROMPTS = [
    f"a {c} {a}, {s}"
    for c, a, s in zip(
        ["red", "blue", "green", "white", "black", "yellow", "pink", "grey"],
        ["cat", "ship", "house", "tree", "dog", "car", "bird", "lamp"],
        ["photo", "sketch", "watercolor", "photo", "oil", "sketch", "photo", "pastel"],
    )
]
# micro_batch 2: one UNet call of 2 pairs x 2 images, the size of the sampler's calls (run.batch_size 2
# groups x K 2), so the reference re-scores the stored log-probs exactly (sampled_gap 0)
COMMON = ["data.micro_batch=2", "train.grad_accum=4", "checkpoint.every=3", "train.max_steps=6"]


@pytest.fixture(scope="module")
def traj(tiny_sd15, tmp_path_factory):
    from stages.sample import cli_main

    d = tmp_path_factory.mktemp("d3po")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = [
        "--config",
        "configs/sample/tiny.yaml",
        f"model.path={tiny_sd15}",
        f"prompts.source={d / 'prompts.txt'}",
        f"output.dir={d / 'traj'}",
        "run.batch_size=2",
    ]
    assert cli_main(args) == 0
    return d / "traj"


@pytest.fixture(scope="module")
def prefs(traj):
    from stages.feedback import cli_main

    out = traj.parent / "prefs"
    assert cli_main(["--config", "configs/feedback/tiny.yaml", f"trajectories={traj}", f"out={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["decided"], summary["ties"]) == (8, 0)
    return out


def d3po_train(traj, prefs, out, *overrides, **kw):
    return train(traj, out, f"data.preferences={prefs}", *overrides, config=CONFIG, **kw)


@pytest.fixture(scope="module")
def run_full(traj, prefs, tmp_path_factory):
    """Full fine-tuning, 6 optimizer steps of 2 pairs x 4 timesteps (1.5 epochs of the 8 pairs)."""
    out = tmp_path_factory.mktemp("d3po_runs") / "full"
    check(d3po_train(traj, prefs, out, *COMMON))
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, folder
    return {k: v for f in files for k, v in load_file(str(f)).items()}


# ---------------------------------------------------------------- in-process: the workload itself


def _workload(traj, prefs, *extra):
    from pipeline.config import load_config
    from pipeline.losses.objectives import build_objective
    from pipeline.schema.train import TrainConfig
    from pipeline.train.trajectories import TrajectoryWorkload

    cfg = load_config(
        TrainConfig, CONFIG, [f"data.shards={traj}", f"data.preferences={prefs}", "output.dir=o", *extra]
    )
    return TrajectoryWorkload(cfg, build_objective(cfg.objective))


def _eval(traj, prefs, policy, reference) -> dict[str, float]:
    """D3PO loss and implicit accuracy of ``policy`` against ``reference`` on every pair x timestep."""
    from pipeline.engine.context import RunContext
    from pipeline.train.workload import Models

    w = _workload(traj, prefs, "data.micro_batch=8")
    w.prepare(RunContext.local(torch.device("cpu")))
    losses, accs = [], []
    with torch.no_grad():
        for batch in zip(range(w.epoch_micro_steps), w.batches(0)):
            out = w.step(Models(policy, reference, None), batch[1], batch[0])
            losses.append(out.loss)
            accs.append(out.stats["accuracy"])
    return {"loss": torch.cat(losses).mean().item(), "accuracy": torch.cat(accs).mean().item()}


def test_micro_steps_map_to_epochs_batches_and_timesteps_as_a_pure_function(traj, prefs):
    from pipeline.engine.context import RunContext

    w = _workload(traj, prefs, "data.micro_batch=2")
    w.prepare(RunContext.local(torch.device("cpu")))
    assert (w.T, w.n_batches, w.epoch_micro_steps) == (4, 4, 16)
    assert [w.position(m) for m in (0, 3, 4, 15, 16, 37)] == [
        (0, 0, 0),
        (0, 0, 3),
        (0, 1, 0),
        (0, 3, 3),
        (1, 0, 0),
        (2, 1, 1),
    ]
    first = [b for _, b in zip(range(40), w.batches(0))]
    again = [b for _, b in zip(range(40 - 21), w.batches(21))]  # a resume at micro-step 21
    for a, b in zip(first[21:], again):
        assert a["micro_step"] == b["micro_step"] and a["keys"] == b["keys"]
        assert torch.equal(a["x_t"], b["x_t"]) and torch.equal(a["t"], b["t"])
    # a pair's 4 slots are its 4 distinct timesteps; x_{t-1} is the transition after x_t
    t = torch.stack([b["t"] for b in first[:4]])
    assert all(len(set(col.tolist())) == 4 for col in t.T)


@pytest.mark.slow
def test_training_lowers_the_d3po_loss_of_the_training_pairs(run_full, traj, prefs, tiny_sd15):
    """(a) at step 1 the policy is the reference: every pair's log-ratios are 0, its loss log 2, and the
    reference re-scores the sampler's stored log-probs exactly; (b) after 6 steps the trained UNet
    prefers the winners on the training pairs: lower loss and higher implicit accuracy than at the start."""
    from pipeline.models import load_unet

    rec = read_pair_records(run_full).to_pydict()
    first = [i for i, s in enumerate(rec["step"]) if s == 1]
    assert len(first) == 2 * 4  # 2 pairs x 4 timesteps
    for i in first:
        assert rec["log_ratio_w"][i] == 0.0 and rec["log_ratio_l"][i] == 0.0 and rec["h"][i] == 0.0
        assert rec["loss"][i] == pytest.approx(math.log(2), abs=1e-6)
        assert rec["sampled_gap"][i] == 0.0
    m = read_metrics(run_full / "metrics.jsonl")
    assert [r["step"] for r in m] == list(range(1, 7))
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and m[0]["accuracy"] == 0.5
    base = load_unet(str(tiny_sd15)).eval()
    trained = load_unet(str(run_full / "export"), subfolder="unet").eval()
    before = _eval(traj, prefs, base, base)
    after = _eval(traj, prefs, trained, base)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["accuracy"] == 0.5
    assert after["loss"] < before["loss"] - 1e-3 and after["accuracy"] > 0.6, after


@pytest.mark.slow
def test_sigkill_and_restart_matches_an_uninterrupted_run(run_full, traj, prefs, tmp_path):
    """(c) killed after step 5 (latest checkpoint 3), restarted with the same command: the metrics,
    the per-pair records and the exported weights equal the uninterrupted run's bit for bit."""
    run = tmp_path / "killed"
    p = d3po_train(
        traj, prefs, run, *COMMON, module="tests.helpers.train_killed", extra_env={"KILL_AT_STEP": 5}
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    check(d3po_train(traj, prefs, run, *COMMON))
    a, b = read_metrics(run_full / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k in ("loss", "accuracy", "h", "log_ratio_w", "log_ratio_l", "clip_frac", "lr", "epoch"):
            assert ra[k] == rb[k], (ra["step"], k)
    ta, tb = _tensors(run_full / "export" / "unet"), _tensors(run / "export" / "unet")
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    pa, pb = read_pair_records(run_full).to_pydict(), read_pair_records(run).to_pydict()
    cols = ("step", "key", "winner", "timestep", "loss")
    assert sorted(zip(*(pa[c] for c in cols))) == sorted(zip(*(pb[c] for c in cols)))


@pytest.mark.slow
def test_two_ranks_see_every_decided_pair_once_per_epoch(traj, prefs, tmp_path):
    """(d) 2 ranks x 2 pairs: an epoch of 8 pairs is 2 optimizer steps; over 4 steps (2 epochs) each
    pair trains once per epoch, at each of its 4 timesteps once, on one rank."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.d3po.feedback_files import load_preferences

    out = tmp_path / "two"
    check(
        d3po_train(
            traj,
            prefs,
            out,
            "data.micro_batch=2",
            "train.grad_accum=4",
            "train.max_steps=4",
            "checkpoint.every=4",
            "checkpoint.export=false",
            nproc=2,
        )
    )
    table, _ = load_preferences(prefs)
    pairs = {(r["key"], r["winner"]) for r in table.to_pylist()}
    per_rank = {
        d.name: pa.concat_tables([pq.read_table(f) for f in sorted(d.glob("upto_*.parquet"))]).to_pydict()
        for d in sorted((out / "pairs").glob("rank_*"))
    }
    assert len(per_rank) == 2
    for epoch_steps in ((1, 2), (3, 4)):
        seen: dict[tuple, list[int]] = {}
        owner = {}
        for name, rec in per_rank.items():
            for s, k, wnr, t in zip(rec["step"], rec["key"], rec["winner"], rec["timestep"]):
                if s in epoch_steps:
                    seen.setdefault((k, wnr), []).append(t)
                    assert owner.setdefault((k, wnr), name) == name  # one rank per pair
        assert set(seen) == pairs, seen
        assert all(sorted(ts) == sorted(set(ts)) and len(ts) == 4 for ts in seen.values()), seen
    m = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in m] == [0, 0, 1, 1] and m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
def test_lora_trains_from_a_ratio_of_one(traj, prefs, tmp_path):
    """(e) LoRA: the reference is the policy with its adapters off; at step 1 the ratio is exactly 1."""
    out = tmp_path / "lora"
    check(
        d3po_train(
            traj,
            prefs,
            out,
            "data.micro_batch=2",
            "train.grad_accum=4",
            "train.max_steps=2",
            "checkpoint.every=2",
            "model.lora_rank=4",
        )
    )
    m = read_metrics(out / "metrics.jsonl")
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and m[0]["h"] == 0.0
    assert m[1]["h"] != 0.0  # the adapters moved
    assert list((out / "export").rglob("*.safetensors"))


# ---------------------------------------------------------------- bad inputs: exit 2, the file named


def _main(args: list[str]) -> int:
    from stages import train as stage

    return stage.cli_main(args)


def _args(traj, prefs, out, *extra):
    return [
        "--config",
        CONFIG,
        f"data.shards={traj}",
        f"data.preferences={prefs}",
        f"output.dir={out}",
        *extra,
    ]


def test_missing_preferences_are_one_line_exit_2(traj, tmp_path, capsys):
    missing = tmp_path / "no_prefs"
    assert _main(_args(traj, missing, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert f"data.preferences={missing}: no such file or folder" in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    # required with objective.name=d3po
    args = ["--config", CONFIG, f"data.shards={traj}", f"output.dir={tmp_path / 'o'}"]
    assert _main(args) == 2
    assert "data.preferences: required for objective.name=d3po" in capsys.readouterr().err


def test_preferences_naming_unknown_groups_are_refused(traj, prefs, tmp_path, capsys):
    from pipeline.d3po.feedback_files import PARQUET, load_preferences, write_preferences

    table, summary = load_preferences(prefs)
    rows = table.to_pylist()
    rows[3]["key"] = "0123456789abcdef0123"
    bad = tmp_path / "bad_prefs"
    keep = {k: v for k, v in summary.items() if k in ("source", "trajectories", "groups", "skipped")}
    write_preferences(bad, rows, json.loads(table.schema.metadata[b"names"]), keep)
    assert _main(_args(traj, bad, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert (
        f"data.preferences={bad / PARQUET} names 1 prompt group(s)" in err and "0123456789abcdef0123" in err
    ), err


def test_trajectories_of_another_model_are_refused(traj, prefs, tiny_sd15, tmp_path, capsys):
    other = tmp_path / "other_model"
    shutil.copytree(tiny_sd15, other)
    sc = other / "scheduler" / "scheduler_config.json"
    c = json.loads(sc.read_text())
    c["beta_end"] = c["beta_end"] * 1.5
    sc.write_text(json.dumps(c))
    assert _main(_args(traj, prefs, tmp_path / "o", f"model.path={other}")) == 2
    err = capsys.readouterr().err
    assert f"data.shards={traj} holds trajectories sampled with" in err and str(other) in err, err


def test_trajectories_of_this_run_are_accepted_and_of_a_foreign_unet_refused(
    traj, prefs, tiny_sd15, tmp_path, capsys
):
    """Sampled with a trained UNet: accepted when it is this run's (output.dir: the online loop's round
    r > 0 continues the policy that sampled them), refused when it is any other UNet."""
    from pipeline.config import load_config
    from pipeline.d3po.trajectories import read_manifest
    from pipeline.schema.train import TrainConfig
    from pipeline.train.trajectories import check_trajectories
    from stages.sample import cli_main as sample

    run, foreign = tmp_path / "run", tmp_path / "foreign_unet"
    shutil.copytree(tiny_sd15 / "unet", run / "export" / "unet")
    shutil.copytree(tiny_sd15 / "unet", foreign)
    folders = {}
    for name, unet in (("ours", run), ("foreign", foreign)):
        folders[name] = tmp_path / name
        assert (
            sample(
                [
                    "--config",
                    "configs/sample/tiny.yaml",
                    f"model.path={tiny_sd15}",
                    f"model.unet={unet}",
                    f"prompts.source={traj.parent / 'prompts.txt'}",
                    "prompts.max=2",
                    f"output.dir={folders[name]}",
                ]
            )
            == 0
        )
    cfg = load_config(
        TrainConfig,
        CONFIG,
        [f"data.shards={folders['ours']}", f"data.preferences={prefs}", f"output.dir={run}"],
    )
    assert check_trajectories(cfg, read_manifest(folders["ours"])).config_hash
    assert _main(_args(folders["foreign"], prefs, run)) == 2
    err = capsys.readouterr().err
    assert f"was sampled with model.unet={foreign.resolve()}" in err and "nor a UNet of this run" in err, err


def test_bad_settings_are_refused_before_any_model_loads(traj, prefs, tmp_path, capsys):
    assert _main(_args(traj, prefs, tmp_path / "o", "train.grad_accum=3")) == 2
    assert "train.grad_accum=3: D3PO accumulates over the trained timesteps" in capsys.readouterr().err
    # pair shards given to D3PO, and preferences given to a pair objective
    assert _main(_args(tmp_path, prefs, tmp_path / "o")) == 2
    assert "objective.name=d3po trains on 'trajectories' data" in capsys.readouterr().err
    assert _main(_args(traj, prefs, tmp_path / "o", "objective.name=dpo")) == 2
    assert "data.preferences: preference files of sampled trajectories train objective.name=d3po or" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_adaptive_d3po_scores_trajectories_and_resumes_exactly(traj, prefs, tmp_path):
    """configs/train/tiny_adaptive_d3po.yaml (EMA half-lives 8 and 1 steps, W renormalised). Step 1: the
    policy and both EMA models are the reference, so every trajectory margin h_traj is 0 and W is 1.
    Later steps weigh pairs unequally around a batch mean of 1. Killed after step 5 and rerun: the same
    metrics (W, u, h_traj included) and the same exported weights as an uninterrupted run."""
    cfg = "configs/train/tiny_adaptive_d3po.yaml"
    # 4 pairs per batch: g is standardized over the batch, and with 2 pairs every pair's g would be +-0.71
    # under every model (s = 0, W = 1)
    args = [f"data.preferences={prefs}", *COMMON, "data.micro_batch=4"]
    ref = tmp_path / "full"
    check(train(traj, ref, *args, config=cfg))
    rec = read_pair_records(ref).to_pydict()
    first = [i for i, s in enumerate(rec["step"]) if s == 1]
    assert first and all(rec["h_traj"][i] == 0.0 and rec["W"][i] == 1.0 for i in first)
    m = read_metrics(ref / "metrics.jsonl")
    assert m[-1]["W"] == pytest.approx(1.0, abs=1e-6) and m[-1]["W_std"] > 0
    assert all(math.isfinite(r["u"]) for r in m[1:])
    run = tmp_path / "killed"
    p = train(
        traj, run, *args, config=cfg, module="tests.helpers.train_killed", extra_env={"KILL_AT_STEP": 5}
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    check(train(traj, run, *args, config=cfg))
    for ra, rb in zip(m, read_metrics(run / "metrics.jsonl")):
        for k in ("loss", "h", "W", "u", "h_traj"):
            assert ra[k] == rb[k], (ra["step"], k)
    ta, tb = _tensors(ref / "export" / "unet"), _tensors(run / "export" / "unet")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
