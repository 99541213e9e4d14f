"""D3PO's online loop (part 4): ``stages.online`` orchestrates sample -> feedback -> train -> evaluate
over rounds of one training run, resumable at any point.

The tiny model, 2 rounds of 4 prompts x K=2 images x 4 DDIM steps, brightness feedback, 2 optimizer
steps per round (configs/online/tiny.yaml), 2 eval prompts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.d3po.loop import round_seed
from pipeline.metrics_log import read_metrics
from tests.helpers.run import ROOT, env

CONFIG = "configs/online/tiny.yaml"
PROMPTS = ["a red cat, photo", "a blue ship, sketch", "a green house, watercolor", "a white tree, photo"]
EVAL = ["a black dog, oil", "a yellow car, sketch"]
STEPS = 2  # configs/online/tiny.yaml steps_per_round


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("online_prompts")
    (d / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    (d / "eval.txt").write_text("\n".join(EVAL) + "\n")
    return d


def args(model, files, out, *extra) -> list[str]:
    return [
        "--config",
        CONFIG,
        f"model.path={model}",
        f"out={out}",
        f"prompts={files / 'train.txt'}",
        f"eval.prompts={files / 'eval.txt'}",
        *extra,
    ]


def start(model, files, out) -> subprocess.Popen:
    """The loop as a user runs it, in its own process group (a scheduler kills the group)."""
    cmd = [sys.executable, "-m", "stages.online", *args(model, files, out)]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-6000:]
    return out


def ban_model_phases(mp: pytest.MonkeyPatch) -> None:
    """Sample, feedback and eval run in children (a process gives its CUDA memory back only when it
    exits, and the trainer shares the GPU): loading a sampler, a feedback run or a reward in the loop's
    own process raises."""
    from pipeline.d3po import feedback, rewards, sampling

    def banned(*a, **k):
        raise AssertionError("a model phase ran in the loop's process")

    for mod, name in (
        (sampling, "sample_trajectories"),  # the sample phase and the eval's samples
        (feedback, "decide_preferences"),  # the feedback phase
        (feedback, "make_rewards"),  # the eval's rewards
        (rewards, "make_reward"),
    ):
        mp.setattr(mod, name, banned)


@pytest.fixture(scope="module")
def online_run(tiny_sd15, files, tmp_path_factory):
    """The uninterrupted two-round loop, run in this process with every model phase banned from it."""
    from stages.online import cli_main

    out = tmp_path_factory.mktemp("online") / "loop"
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(k, raising=False)
        for k, v in env().items():  # the children's environment as start()'s (one thread: the same bytes)
            mp.setenv(k, v)
        ban_model_phases(mp)
        assert cli_main(args(tiny_sd15, files, out)) == 0
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _eval_values(out: Path) -> dict:
    return {
        d: json.loads((out / d / "scores.json").read_text())["rewards"]
        for d in ("eval_base", "round_000/eval", "round_001/eval")
    }


@pytest.mark.slow
def test_two_rounds_continue_one_run_and_report(online_run, tiny_sd15, files, capsys):
    """(a) both rounds report; the run's steps go 1..4 without a restart; round 1 sampled the export."""
    out = online_run
    steps = [r["step"] for r in read_metrics(out / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 2 * STEPS + 1)), steps
    assert "resumed from" in (out / "round_001" / "train.log").read_text()
    m0 = json.loads((out / "round_000" / "sample" / "manifest.json").read_text())["model"]["unet"]
    m1 = json.loads((out / "round_001" / "sample" / "manifest.json").read_text())["model"]["unet"]
    assert m0["kind"] == "base"
    assert (m1["kind"], m1["path"]) == ("unet", str((out / "run" / "export" / "unet").resolve()))
    for r in (0, 1):
        rep = json.loads((out / f"round_{r:03d}" / "report.json").read_text())
        assert rep["round"] == r and rep["train"]["steps"] == [r * STEPS + 1, (r + 1) * STEPS]
        assert rep["train"]["last_step"] == (r + 1) * STEPS and rep["train"]["loss"] is not None
        b = rep["eval"]["brightness"]
        assert b["n"] == 2 * len(EVAL) and b["se"] is not None and 0 < b["mean"] < 1
        assert set(rep["seconds"]) == {"sample", "feedback", "train", "eval"}
        # what moves when it learns: the paired win rate against the base, the log-ratio gap
        now, base = (
            np.array(json.loads((out / d / "scores.json").read_text())["rewards"]["brightness"]["values"])
            for d in (f"round_{r:03d}/eval", "eval_base")
        )
        assert rep["win_rate"]["brightness"]["rate"] == pytest.approx(
            np.mean((now > base) + 0.5 * (now == base))
        )
        rows = [
            m for m in read_metrics(out / "run" / "metrics.jsonl") if r * STEPS < m["step"] <= (r + 1) * STEPS
        ]
        gap = np.mean([m["log_ratio_w"] - m["log_ratio_l"] for m in rows])
        assert rep["train"]["log_ratio_gap"] == pytest.approx(gap) and 0 <= rep["train"]["clip_frac"] <= 1
        assert (out / f"round_{r:03d}" / "eval" / "grid.png").is_file()
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [-1, 0, 1]
    assert (out / "reward_by_round.png").is_file() and (out / "eval_base" / "grid.png").is_file()
    assert (out / "learning_by_round.png").is_file()
    # the round-0 train starts at the base: D3PO's loss is log 2 at step 1
    first = read_metrics(out / "run" / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)

    # a rerun of a finished loop skips every phase and changes nothing
    from stages.online import cli_main

    before = (out / "run" / "metrics.jsonl").read_bytes()
    assert cli_main(args(tiny_sd15, files, out)) == 0
    text = capsys.readouterr().out
    assert text.count("done before, skipped") == 1 + 4 * 2, text
    assert (out / "run" / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_killed_in_round_1_and_rerun_equals_an_uninterrupted_run(online_run, tiny_sd15, files, tmp_path):
    """(b) SIGKILL of the loop (and its trainer) in round 1's train phase, after its first checkpoint;
    the same command again: the exported weights and every eval reward equal the uninterrupted run's."""
    out = tmp_path / "loop"
    p = start(tiny_sd15, files, out)
    latest = out / "run" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if latest.is_file() and latest.read_text().strip() == f"step_{STEPS + 1:08d}":
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the loop finished before the kill point"
    assert not (out / "round_001" / "train.done").exists()
    finish(start(tiny_sd15, files, out))
    ta, tb = _tensors(online_run / "run" / "export" / "unet"), _tensors(out / "run" / "export" / "unet")
    assert ta and set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _eval_values(online_run) == _eval_values(out)
    a, b = read_metrics(online_run / "run" / "metrics.jsonl"), read_metrics(out / "run" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 2 * STEPS + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_bad_config_exits_2_naming_the_key_or_file(tiny_sd15, files, tmp_path, capsys):
    """(c) one-line errors before anything runs."""
    from stages.online import cli_main

    out = tmp_path / "loop"
    assert cli_main(args(tiny_sd15, files, out, "rounds=0")) == 2
    assert "rounds" in capsys.readouterr().err
    missing = tmp_path / "nope.txt"
    assert cli_main(args(tiny_sd15, files, out, f"prompts={missing}")) == 2
    assert f"prompts={missing}: no such file" in capsys.readouterr().err
    assert cli_main(args(tiny_sd15, files, out, f"eval.prompts={missing}")) == 2
    assert f"eval.prompts={missing}: no such file" in capsys.readouterr().err
    assert cli_main(args(tiny_sd15, files, out, "sample_overrides=[sampler.eta=0]")) == 2
    err = capsys.readouterr().err
    assert "sample_overrides=['sampler.eta=0']" in err and "sampler.eta" in err, err
    assert cli_main(args(tiny_sd15, files, out, "train_overrides=[objective.name=dpo]")) == 2
    assert "objective.name=dpo" in capsys.readouterr().err
    assert cli_main(args(tiny_sd15, files, out, "eval.rewards=[aesthetic]")) == 2
    assert "eval.rewards: aesthetic needs its scorer folder" in capsys.readouterr().err
    assert not out.exists()


def test_pair_flips_are_redrawn_every_round_prompt_flips_are_not(tiny_sd15, files, tmp_path):
    """Round r's feedback flips pairs with a hash of (flip_seed, r) (a labeller's slips fall on other pairs each
    round); flips by prompt keep the seed (the same prompts' minority taste every round)."""
    from pipeline.config import load_config
    from pipeline.d3po.loop import Loop
    from pipeline.schema.online import OnlineConfig

    def seeds(by: str) -> list[int]:
        over = [
            *args(tiny_sd15, files, tmp_path / "x")[2:],
            f"feedback_overrides=[flip_rate=0.3,flip_by={by},flip_seed=7]",
        ]
        loop = Loop(load_config(OnlineConfig, CONFIG, over))
        return [loop.feedback_cfg(tmp_path, tmp_path / "fb", r).flip_seed for r in range(3)]

    pair = seeds("pair")
    assert pair == [7, round_seed(7, 1), round_seed(7, 2)] and len(set(pair)) == 3
    assert seeds("prompt") == [7, 7, 7]


def test_win_rate_against_the_base_is_paired_by_image(tmp_path):
    """Image i after the round against image i of the base (same prompt, same noise): 0.1 < 0.2 loses,
    0.5 = 0.5 ties, 0.3 > 0.1 wins: (0 + 0.5 + 1) / 3."""
    from pipeline.d3po.round_report import win_rate

    for d, v in (("now", [0.1, 0.5, 0.3]), ("base", [0.2, 0.5, 0.1])):
        (tmp_path / d).mkdir()
        (tmp_path / d / "scores.json").write_text(json.dumps({"rewards": {"brightness": {"values": v}}}))
    w = win_rate(tmp_path / "now", tmp_path / "base")["brightness"]
    assert w["rate"] == pytest.approx(0.5) and w["n"] == 3 and w["se"] == pytest.approx((0.25 / 3) ** 0.5)


def test_round_seeds_of_neighbouring_loop_seeds_do_not_collide():
    """seed + r made round 1 of loop seed s sample with round 0 of loop seed s + 1's noise."""
    seen = [round_seed(s, r) for s in range(20) for r in range(50)]
    assert len(set(seen)) == len(seen) and all(0 <= x < 2**31 for x in seen)


@pytest.mark.slow
def test_the_loop_process_loads_no_model(online_run):
    """The fixture's loop ran in this process with sampling, feedback and rewards banned from it
    (ban_model_phases) and finished both rounds: every model phase ran in a child."""
    rep = json.loads((online_run / "report.json").read_text())
    assert [r["round"] for r in rep["rounds"]] == [-1, 0, 1]
    for d in ("eval_base", "round_000/eval", "round_001/eval"):
        assert (online_run / d / "scores.json").is_file()
    assert (online_run / "round_001" / "sample" / "manifest.json").is_file()


@pytest.mark.slow
def test_a_failing_phase_child_stops_the_loop_with_its_code(tiny_sd15, files, tmp_path):
    """A phase child's error (here: the eval prompts vanish after the config check) ends the loop with
    the child's exit code, and leaves the phase unfinished for a rerun."""
    from pipeline.config import load_config, write_resolved
    from pipeline.d3po.loop import Loop, PhaseFailed
    from pipeline.schema.online import OnlineConfig

    gone = tmp_path / "eval.txt"
    gone.write_text("\n".join(EVAL) + "\n")
    over = [*args(tiny_sd15, files, tmp_path / "loop")[2:], f"eval.prompts={gone}"]
    loop = Loop(load_config(OnlineConfig, CONFIG, over))
    loop.out.mkdir(parents=True)
    write_resolved(loop.cfg, loop.out / "config.yaml")
    gone.unlink()
    with pytest.raises(PhaseFailed) as e:
        loop.phase(loop.out / "eval_base", "eval", loop.do_eval, -1)
    assert e.value.rc == 2 and "the base's eval exited 2" in str(e.value)
    assert not (loop.out / "eval_base" / "eval.done").exists()


CHILD_OF_A_KILLED_LOOP = """
import ctypes, os, sys, threading, time
from pathlib import Path
from pipeline.d3po.loop import spawn

def no_dlopen(*a, **k):
    raise RuntimeError("a library loaded between fork and exec")

ctypes.CDLL = no_dlopen  # the child's preexec_fn may use only what was resolved at import
stop = threading.Event()
busy = [threading.Thread(target=lambda: [time.sleep(0) for _ in iter(stop.is_set, True)], daemon=True)
        for _ in range(4)]  # threads running while the loop forks, as CUDA's and the tokenizers' do
for t in busy:
    t.start()
pid_file = Path(sys.argv[1])
code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
spawn([sys.executable, "-c", code])
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_the_loop(tmp_path):
    """SIGKILL of the loop alone (not its process group): its child gets SIGKILL too, from the prctl
    made in a preexec_fn that loads nothing (ctypes.CDLL is sabotaged) while other threads run."""
    pid_file = tmp_path / "child.pid"
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD_OF_A_KILLED_LOOP, str(pid_file)],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
        assert p.poll() is None, p.communicate()[0]
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _alive(child)
    p.kill()
    p.communicate(timeout=30)
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived the loop")
