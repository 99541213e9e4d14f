"""`make gpu-check` (tools/benchmarks/gpu_check.py) in its CPU mode, as CI runs it: every line passes or is skipped
with a reason, and the JSON + markdown that go into BENCHMARKS.md are written. On a GPU the same script
runs the same lines with NCCL, fp16/bf16 and xformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers.run import ROOT, env


@pytest.mark.slow
def test_the_gpu_check_runs_in_cpu_mode(tmp_path):
    out = tmp_path / "gc"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.benchmarks.gpu_check",
            "--cpu",
            "--out",
            str(out),
            "--skip",
            "full_sdxl",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    rows = {r["name"]: r for r in res["results"]}
    assert set(rows) == {
        "environment",
        "attention",
        "optimizer",
        "encode_sd15",
        "encode_sdxl",
        "adaptive_resume",
        "host_syncs",
        "lora",
        "d3po",
        "multi_gpu",
        "full_sd15",
    }
    assert all(r["status"] == "pass" for r in rows.values()), {n: r["detail"] for n, r in rows.items()}
    f = {n: r["figures"] for n, r in rows.items()}
    assert f["environment"]["mode"] == "cpu" and f["environment"]["precision"] == "fp32"
    assert f["adaptive_resume"]["bit_identical"] is True and f["adaptive_resume"]["killed_after_step"] == 4
    assert f["d3po"]["loss_step1"] == pytest.approx(math.log(2), abs=1e-6)
    assert f["multi_gpu"]["backend"] == "gloo" and f["multi_gpu"]["resumed_on"] == 1
    assert f["encode_sd15"]["pairs_vae_fp32"] == f["encode_sdxl"]["pairs_vae_fp32"] == 48
    # one timed step each on the CPU: the times are only checked to be there (speed lives in BENCHMARKS.md);
    # the EMA gathers are counted, not timed: none per step with resident buffers on one process
    assert f["full_sd15"]["dpo_step_s"] > 0 and f["full_sd15"]["adaptive_m3_over_dpo"] > 0
    assert f["full_sd15"]["adaptive_m3_ema_gathers_per_step"] == 0
    assert f["full_sd15"]["zero1_dpo_step_s"] > 0 and f["full_sd15"]["grad_accum"] == 4
    assert (
        f["full_sd15"]["d3po_step_s"] > 0 and f["full_sd15"]["d3po_mfu"] > 0
    )  # against the measured CPU peak
    assert f["host_syncs"]["syncs_per_inner_micro_step"] == 1 and f["host_syncs"]["micro_steps"] == 12
    md = (out / "gpu_check.md").read_text()
    assert md.count("\n| ") == 1 + len(rows) and "| adaptive_resume | pass |" in md


def test_a_failing_line_fails_the_run_and_says_why(tmp_path, monkeypatch):
    from tools.benchmarks import gpu_check

    def broken(ctx):
        raise RuntimeError("xformers: no kernel for head dim 160")

    monkeypatch.setitem(gpu_check.CHECKS, "optimizer", broken)
    monkeypatch.setattr(gpu_check.platform, "processor", lambda: "")  # it runs `uname -p`: no subprocess here
    assert gpu_check.main(["--cpu", "--out", str(tmp_path), "--only", "optimizer", "environment"]) == 1
    rows = {r["name"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["results"]}
    assert rows["optimizer"]["status"] == "fail" and "head dim 160" in rows["optimizer"]["detail"]
    assert rows["environment"]["status"] == "pass"
    assert "| optimizer | fail |" in (tmp_path / "gpu_check.md").read_text()
