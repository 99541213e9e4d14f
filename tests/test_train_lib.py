"""The trainer's library pieces on their own: the per-pair statistics all-gather and its summary, the
objective-state agreement check (several real gloo processes where ranks matter)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.engine.dist import free_port
from pipeline.train.stats import StatsAccumulator, gather_pair_stats, summarize


def test_gather_on_one_rank_keeps_values_and_dtypes_exactly():
    stats = {"h": torch.tensor([0.1, -2.5e-7]), "W": torch.tensor([1.0, float("nan")])}
    fields = {
        "user_id": torch.tensor([2**53 + 1, -7], dtype=torch.int64),  # not representable in float64
        "flipped": torch.tensor([True, False]),
        "true_agrees": torch.tensor([float("nan"), 1.0]),
    }
    g = gather_pair_stats(stats, fields, torch.device("cpu"), world=1)
    assert g["user_id"].dtype == np.int64 and g["user_id"].tolist() == [2**53 + 1, -7]
    assert g["flipped"].dtype == bool and g["flipped"].tolist() == [True, False]
    assert g["h"].dtype == np.float32 and g["h"].tolist() == stats["h"].tolist()
    assert np.isnan(g["W"][1]) and g["W"][0] == 1.0
    assert np.isnan(g["true_agrees"][0]) and g["true_agrees"][1] == 1.0


def test_summary_means_ignore_warmup_nans_and_distributions_get_a_std():
    acc = StatsAccumulator()
    acc.add({"h": np.array([1.0, 3.0], np.float32), "u": np.array([np.nan, np.nan], np.float32)})
    acc.add({"h": np.array([5.0], np.float32), "u": np.array([2.0], np.float32)})
    cat = acc.pop()
    assert acc.pop() == {}  # popped: the next log line starts empty
    s, hists = summarize(cat, ["h", "u"], distributions=("h",))
    assert s["h"] == pytest.approx(3.0) and s["h_std"] == pytest.approx(np.std([1.0, 3.0, 5.0]))
    assert s["u"] == 2.0 and "u_std" not in s  # the NaN (warm-up) entries are left out of the mean
    assert set(hists) == {"h"}
    s, _ = summarize({"u": np.full(3, np.nan, np.float32)}, ["u"], ())
    assert s == {}  # an all-NaN stat is not logged


def _two_ranks(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from pipeline.engine.checkpoint import check_same_on_all_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stats = {"h": torch.tensor([float(rank), 0.5 + rank])}
    fields = {
        "user_id": torch.tensor([2**40 + rank, 3], dtype=torch.int64),
        "flipped": torch.tensor([rank == 1, False]),
    }
    g = gather_pair_stats(stats, fields, torch.device("cpu"), world)
    same = {"n": torch.tensor([1, 2])}
    check_same_on_all_ranks(same, "same")  # equal: no error
    try:
        check_same_on_all_ranks({"n": torch.tensor([1, rank])}, "the objective's state")
        raised = ""
    except RuntimeError as e:
        raised = str(e)
    out[rank] = {k: v.tolist() for k, v in g.items()} | {"raised": raised}
    dist.destroy_process_group()


def _entry(rank, world, port, q):
    out: dict = {}
    _two_ranks(rank, world, port, out)
    q.put(out)


@pytest.mark.slow
def test_every_rank_gets_every_ranks_values_and_a_diverged_state_is_caught():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = {}
    for _ in procs:
        res.update(q.get(timeout=900))  # a loaded 2-core machine: minutes
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    want = {
        "h": [0.0, 0.5, 1.0, 1.5],
        "user_id": [2**40, 3, 2**40 + 1, 3],
        "flipped": [False, False, True, False],
    }
    for r in (0, 1):
        assert {k: res[r][k] for k in want} == want, r
        assert "the objective's state differs between ranks" in res[r]["raised"], r


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "adaptive_dpo"])
def test_minority_aurocs_are_logged_only_for_objectives_with_a_score(objective, shards16, tmp_path):
    """SFT has no margin h and no minority score u: its AUROC of "-h" was a constant 0.5 (h filled with
    zeros). Adaptive-DPO logs the AUROC of -h (u is NaN during its EMA warm-up, so no AUROC of u yet)."""
    from pipeline.metrics_log import read_metrics
    from tests.helpers.run import check, train

    out = tmp_path / objective
    check(
        train(
            shards16,
            out,
            f"objective.name={objective}",
            "ema.decays=[0.5]",
            "data.flip_rate=0.5",
            "train.max_steps=2",
            "checkpoint.export=false",
            "output.pair_records=false",
        )
    )
    m = read_metrics(out / "metrics.jsonl")
    assert len(m) == 2
    aurocs = {k for r in m for k in r if k.startswith("auroc")}
    if objective == "sft":
        assert aurocs == set()
    else:
        assert "auroc_neg_h_window" in aurocs and all(0.0 <= r["auroc_neg_h_window"] <= 1.0 for r in m)


def test_a_checkpoint_of_an_older_version_resumes_while_new_keys_hold_their_defaults():
    """A key this version added (absent from the checkpoint's config.yaml) is no difference at its
    schema default, and is one when set to something else; a removed or changed key always is."""
    from pipeline.config import load_config, to_dict
    from pipeline.engine.checkpoint import config_differences
    from pipeline.schema.train import RESUMABLE_KEYS, TrainConfig

    cfg = to_dict(load_config(TrainConfig, "configs/train/tiny_dpo.yaml", ["data.shards=s", "output.dir=o"]))
    old = {**cfg, "train": {k: v for k, v in cfg["train"].items() if k != "loss_scale"}}
    assert config_differences(old, cfg, RESUMABLE_KEYS, TrainConfig) == []
    cfg["train"]["loss_scale"]["window"] = 7
    assert config_differences(old, cfg, RESUMABLE_KEYS, TrainConfig) == [
        "train.loss_scale.window: None in the checkpoint, 7 now"
    ]
    assert config_differences(old, cfg, RESUMABLE_KEYS) != []  # without the schema: every new key differs
