"""Untrusted files never run code: a pickle payload planted in any DeepSpeed file of a checkpoint
(model states, optimizer partitions) is refused by every loader (``load_checkpoint_unet``,
``stages.evaluate``, resume, the universal conversion) with the file named, and the payload never
runs; genuine checkpoints of every precision still load. Exact resume through the restricted loader
(same and other world sizes) is tests/test_train.py's."""

from __future__ import annotations

import pathlib
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.engine.safe_load import ALLOWED, RefusedCheckpoint, restricted_torch_load
from pipeline.metrics_log import read_metrics
from tests.helpers.run import ROOT, check, env, train

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
COMMON = ("train.max_steps=2", "checkpoint.every=1")


class Payload:
    """Unpickling it touches ``marker``: the stand-in for any command a crafted file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _plant(file: Path, marker: Path) -> None:
    """Add a payload to a genuine DeepSpeed file, keeping everything else it holds."""
    with restricted_torch_load():
        sd = torch.load(file, map_location="cpu", weights_only=False)
    sd["payload"] = Payload(marker)
    torch.save(sd, file)


def _copy_run(run: Path, dst: Path, plant_in: str | None, marker: Path) -> Path:
    """A copy of ``run`` that resumes as a run of its own (``output.dir`` in its configs moved)."""
    shutil.copytree(run, dst)
    for cfg in [dst / "config.yaml", *dst.glob("checkpoints/step_*/config.yaml")]:
        c = yaml.safe_load(cfg.read_text())
        c["output"]["dir"] = str(dst)
        cfg.write_text(yaml.safe_dump(c, sort_keys=False))
    if plant_in is not None:
        _plant(dst / "checkpoints" / "step_00000002" / plant_in, marker)
    return dst


@pytest.fixture(scope="module")
def genuine_run(shards16, tmp_path_factory) -> Path:
    """A real 2-step run: checkpoints step_1 and step_2 (latest), export/ of step 2."""
    out = tmp_path_factory.mktemp("untrusted") / "run"
    check(train(shards16, out, *COMMON))
    return out


def test_the_payload_is_real_and_the_context_refuses_it(tmp_path):
    f, marker = tmp_path / "evil.pt", tmp_path / "MARKER"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, f)
    torch.load(f, weights_only=False)  # the control: an ordinary load runs it
    assert marker.exists()
    marker.unlink()
    bound = types.ModuleType("bound_load")  # a module that did `from torch import load`
    bound.load = torch.load
    sys.modules[bound.__name__] = bound
    allowed_before = torch.serialization.get_safe_globals()
    try:
        with restricted_torch_load("try the export"):
            for load in (torch.load, torch.serialization.load, bound.load):
                with pytest.raises(RefusedCheckpoint) as e:
                    load(f, map_location="cpu", pickle_module=pickle, weights_only=False)
                msg = str(e.value)
                assert msg.startswith(f"{f}: refused") and msg.endswith("; try the export")
                assert "getattr" in msg and "\n" not in msg
            with restricted_torch_load():  # re-entrant: the inner exit keeps the outer restriction
                pass
            with pytest.raises(RefusedCheckpoint):
                torch.load(f, weights_only=False)
        assert not marker.exists()
        assert bound.load is torch.load is torch.serialization.load  # all restored
        # torch keeps its safe globals in a set: compare contents, not order
        assert set(torch.serialization.get_safe_globals()) == set(allowed_before)
    finally:
        del sys.modules[bound.__name__]


def test_deepspeed_state_of_every_precision_loads_restricted(tmp_path):
    """The optimizer state's DeepSpeed objects, fp16's dynamic loss scaler included (as the ds_config
    builds it; an fp16 engine needs a GPU), come back equal through the restricted loader."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    dynamic = DynamicLossScaler(2**16, 1000, 1, 2, False, raise_error_at_min_scale=True, dtype=torch.half)
    dynamic.cur_iter, dynamic.cur_hysteresis = 7, 1
    state = {
        "loss_scaler": dynamic,
        "static": LossScaler(1.0),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=6, start=0)}],
        "m": torch.arange(3.0),
    }
    f = tmp_path / "optim.pt"
    torch.save(state, f)
    with restricted_torch_load():
        back = torch.load(f, weights_only=False)
    assert type(back["loss_scaler"]) is DynamicLossScaler and vars(back["loss_scaler"]) == vars(dynamic)
    assert vars(back["static"]) == vars(state["static"])
    assert back["zero_stage"] is ZeroStageEnum.gradients
    assert back["param_slice_mappings"] == state["param_slice_mappings"]
    assert torch.equal(back["m"], state["m"])


@pytest.mark.slow
def test_genuine_checkpoints_hold_only_the_allowlisted_classes(genuine_run, shards16, tmp_path):
    """The allowlist is what DeepSpeed writes, no more: every file of an fp32 and an fp16 run (dynamic
    loss scaling, on the CPU through ``train.fp16_on_cpu``) loads restricted, and every allowlisted
    class is used. (bf16 files hold the fp32 ones' classes.)"""
    fp16 = tmp_path / "fp16"
    check(
        train(
            shards16,
            fp16,
            "train.max_steps=1",
            "checkpoint.every=1",
            "checkpoint.export=false",
            "train.precision=fp16",
            "train.fp16_on_cpu=true",
        )
    )
    assert read_metrics(fp16 / "metrics.jsonl")[-1]["loss_scale"] > 1  # fp16 ran, with a dynamic loss scaler
    files = [*(genuine_run / "checkpoints").glob("step_*/*.pt"), *fp16.glob("checkpoints/*/*.pt")]
    assert len(files) == 6
    used = set()
    for f in files:
        used |= set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
        with restricted_torch_load():
            torch.load(f, weights_only=False)
    assert used == set(ALLOWED)


@pytest.mark.slow
@pytest.mark.parametrize("plant_in", [MODEL, OPTIM])
def test_load_checkpoint_unet_refuses_a_planted_file(plant_in, genuine_run, tiny_sd15, tmp_path):
    from pipeline.engine.checkpoint import load_checkpoint_unet

    marker = tmp_path / "MARKER"
    run = _copy_run(genuine_run, tmp_path / "run", plant_in, marker)
    with pytest.raises(RefusedCheckpoint) as e:
        load_checkpoint_unet(run / "checkpoints" / "step_00000002", str(tiny_sd15))
    assert not marker.exists()
    assert str(run / "checkpoints" / "step_00000002" / plant_in) in str(e.value)
    assert "export/" in str(e.value)


@pytest.mark.slow
def test_a_genuine_checkpoint_loads_as_the_exported_unet(genuine_run, tiny_sd15):
    from pipeline.engine.checkpoint import load_checkpoint_unet

    unet = load_checkpoint_unet(genuine_run / "checkpoints" / "step_00000002", str(tiny_sd15))
    exported = load_file(str(genuine_run / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    state = unet.state_dict()
    assert set(state) == set(exported)
    assert all(torch.equal(state[k], exported[k]) for k in exported)


@pytest.mark.slow
def test_evaluate_cli_refuses_a_planted_checkpoint(genuine_run, shards16, tmp_path):
    marker = tmp_path / "MARKER"
    run = _copy_run(genuine_run, tmp_path / "run", MODEL, marker)
    step = run / "checkpoints" / "step_00000002"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.evaluate",
            "--config",
            "configs/eval/tiny.yaml",
            f"output={tmp_path / 'report'}",
            f"models.unets.p={step}",
            f"preference.shards={shards16}",
            "preference.draws=1",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2, p.stderr[-3000:]
    err = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(err) == 1 and str(step / MODEL) in err[0] and "export/" in err[0], p.stderr[-3000:]
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("plant_in", [MODEL, OPTIM])
def test_resume_refuses_a_planted_checkpoint(plant_in, genuine_run, shards16, tmp_path):
    marker = tmp_path / "MARKER"
    run = _copy_run(genuine_run, tmp_path / "run", plant_in, marker)
    p = train(shards16, run, *COMMON[1:], "train.max_steps=3")
    assert p.returncode == 2, p.stderr[-3000:]
    assert str(run / "checkpoints" / "step_00000002" / plant_in) in p.stderr and "refused" in p.stderr
    assert not marker.exists()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]  # nothing trained


@pytest.mark.slow
def test_the_universal_conversion_refuses_a_planted_checkpoint(genuine_run, tmp_path):
    """ds_to_universal runs in a subprocess of its own: it loads through the restricted loader too."""
    from pipeline.engine.checkpoint import ensure_universal
    from pipeline.errors import UserError

    marker = tmp_path / "MARKER"
    run = _copy_run(genuine_run, tmp_path / "run", OPTIM, marker)
    with pytest.raises(UserError) as e:
        ensure_universal(run / "checkpoints", "step_00000002", rank=0)
    assert not marker.exists()
    assert str(run / "checkpoints" / "step_00000002" / OPTIM) in str(e.value)
    assert not (run / "checkpoints" / "universal" / "step_00000002" / "done").exists()
    # genuine checkpoints convert and load: tests/test_train.py's world-size tests
