"""The one door to torch.distributed (pipeline/engine/dist.py): no collective called elsewhere, tensors
on the collective's device per backend, the launch environment of torchrun / deepspeed / srun read or
refused, and every helper run for real in a 2-process gloo group."""

from __future__ import annotations

import ast
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.engine import dist as door
from pipeline.engine.checkpoint import ensure_universal
from pipeline.engine.precision import check_precision
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "all_reduce",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "monitored_barrier",
}
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}


def _collective_calls(path: Path) -> list[str]:
    """``file:line name`` of each call of a torch.distributed / deepspeed.comm collective in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: set[str] = set()  # names bound to a distributed module
    direct: set[str] = set()  # collectives imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in DIST_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in COLLECTIVES:
                    direct.add(a.asname or a.name)
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in direct:
            found.append(f"{where}:{node.lineno} {f.id}")
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            owner = ast.unparse(f.value)
            if owner in aliases or owner in DIST_MODULES:
                found.append(f"{where}:{node.lineno} {owner}.{f.attr}")
    return found


def test_every_collective_goes_through_the_door():
    door_file = ROOT / "pipeline" / "engine" / "dist.py"
    files = [p for d in ("pipeline", "stages", "tools") for p in (ROOT / d).rglob("*.py") if p != door_file]
    outside = [c for p in files for c in _collective_calls(p)]
    assert not outside, "collectives outside pipeline/engine/dist.py:\n" + "\n".join(outside)
    seen = {c.split()[-1] for c in _collective_calls(door_file)}  # the scanner sees the door's own calls
    assert {
        "dist.all_reduce",
        "dist.gather",
        "dist.broadcast",
        "dist.barrier",
        "dist.all_gather_object",
    } <= seen


def test_the_scanner_finds_each_way_of_calling_a_collective(tmp_path):
    src = tmp_path / "_scan_probe.py"
    src.write_text(
        "import torch.distributed as d\nfrom torch import distributed\nfrom torch.distributed import barrier as b\n"
        "import deepspeed.comm as dc\nimport torch\n"
        "d.all_gather([], x)\ndistributed.all_reduce(x)\nb()\ndc.broadcast(x, 0)\ntorch.distributed.gather(x)\n"
        "d.get_rank()\n"
    )
    names = [c.split()[-1] for c in _collective_calls(src)]
    assert names == [
        "d.all_gather",
        "distributed.all_reduce",
        "b",
        "dc.broadcast",
        "torch.distributed.gather",
    ]


def test_the_collective_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert door.collective_device("nccl") == torch.device("cuda", 3)
    assert door.collective_device("cpu:gloo,cuda:nccl") == torch.device("cuda", 3)
    assert door.collective_device("gloo") == torch.device("cpu")
    assert door.collective_device() == torch.device("cpu")  # no process group here


def test_bf16_is_refused_below_compute_capability_8(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a V100 (emulation): the check reads the capability."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    with pytest.raises(UserError, match=r"V100.*capability 7\.0.*use fp16"):
        check_precision("bf16", torch.device("cuda", 0))
    assert check_precision("fp16", torch.device("cuda", 0)) is torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert check_precision("bf16", torch.device("cuda", 0)) is torch.bfloat16


# ---------------------------------------------------------------------------- the launch environment


def test_slurm_node_lists_expand():
    assert door.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert door.expand_nodelist("n7") == ["n7"]
    assert door.expand_nodelist("a[9-11]") == ["a9", "a10", "a11"]
    for bad in ("gpu[a-b]", "gpu[01-", ""):
        with pytest.raises(ValueError, match="node list"):
            door.expand_nodelist(bad)


def test_the_launch_is_read_from_torchrun_srun_or_nothing():
    tr = door.resolve_launch(
        {
            "RANK": "9",
            "WORLD_SIZE": "16",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n0",
            "MASTER_PORT": "29500",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
        }
    )
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port) == (9, 16, 1, "n0", 29500)
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    s = door.resolve_launch(slurm)
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.master_port) == (
        5,
        8,
        1,
        "gpu07",
        15000 + 123456 % 20000,
    )
    assert (
        door.resolve_launch(slurm | {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "7"}).master_addr == "10.0.0.1"
    )
    one_node = door.resolve_launch({**slurm, "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "gpu07"})
    assert one_node.master_addr == "127.0.0.1"
    alone = door.resolve_launch({})
    assert (alone.rank, alone.world_size, alone.master_addr) == (0, 1, "127.0.0.1") and alone.master_port > 0


@pytest.mark.parametrize(
    "env,message",
    [
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1", "SLURM_NNODES": "2"}, "MASTER_ADDR"),
        (
            {
                "SLURM_PROCID": "0",
                "SLURM_NTASKS": "8",
                "SLURM_JOB_ID": "1",
                "SLURM_NNODES": "2",
                "SLURM_JOB_NODELIST": "gpu[x]",
            },
            "node list",
        ),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "1"}, "MASTER_PORT"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
        (
            {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
            r"rank 2 is not in \[0, world_size=2\)",
        ),
    ],
)
def test_what_cannot_be_resolved_is_refused(env, message):
    with pytest.raises(UserError, match=message):
        door.resolve_launch(env)


def test_the_device_of_a_rank():
    assert door.device_index(3, 8) == 3
    assert door.device_index(5, 1) == 0  # srun --gpus-per-task=1: each task sees its own GPU as device 0
    with pytest.raises(UserError, match="local rank 5 but 4 GPUs are visible"):
        door.device_index(5, 4)


# ---------------------------------------------------------------------------- the universal conversion's wait


def test_other_ranks_wait_for_the_universal_conversion_on_a_file(tmp_path):
    root = tmp_path / "checkpoints"
    done = root / "universal" / "step_00000002" / "done"

    def finish_later():
        time.sleep(0.3)
        done.parent.mkdir(parents=True)
        done.write_text("ok\n")

    t = threading.Thread(target=finish_later)
    t.start()
    start = time.monotonic()
    assert ensure_universal(root, "step_00000002", rank=1, wait_min=1, poll_s=0.05) == root / "universal"
    t.join()
    assert 0.25 < time.monotonic() - start < 5
    (root / "universal" / "step_00000003.failed").write_text("RuntimeError: disk full\n")
    with pytest.raises(UserError, match="rank 0 could not convert .*disk full"):
        ensure_universal(root, "step_00000003", rank=1, wait_min=1, poll_s=0.05)
    with pytest.raises(UserError, match=r"waited 0.001 min .*dist\.universal_wait_min"):
        ensure_universal(root, "step_00000004", rank=1, wait_min=0.001, poll_s=0.01)


# ---------------------------------------------------------------------------- 2 processes on gloo


def _worker(rank: int, port: int, tmp: str, q) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    info = door.init_distributed("cpu", timeout_min=2)
    out: dict = {"info": (info.rank, info.world, info.backend, str(info.device))}
    out["max"] = door.all_reduce_max(float(rank + 1))
    out["stack"] = door.all_gather_stack(torch.tensor([rank, 10 + rank])).tolist()
    flat = torch.zeros(6)
    door.all_gather_flat(
        flat, torch.full((3,), rank + 0.5, dtype=torch.float64)
    )  # cast to the output's dtype
    out["flat"] = flat.tolist()
    flat2 = torch.zeros(6, dtype=torch.float16)
    work, _ = door.all_gather_flat(flat2, torch.full((3,), float(rank)), async_op=True)
    work.wait()
    out["flat_async"] = flat2.tolist()
    got = door.gather_to_rank0(torch.tensor([rank * 2.0]))
    out["gather"] = None if got is None else [g.tolist() for g in got]
    t = torch.tensor([float(rank)])
    out["broadcast"] = door.broadcast_(t, src=1).tolist()
    out["sum"] = door.all_reduce_(torch.tensor([1.0, rank]), "sum").tolist()
    out["objects"] = door.all_gather_object({"rank": rank})
    door.barrier()
    door.check_shared_dir(Path(tmp) / "shared")
    try:
        door.check_shared_dir(Path(tmp) / f"local_{rank}")  # a node-local output.dir
        out["local"] = "accepted"
    except UserError as e:
        out["local"] = str(e)
    q.put((rank, out))


@pytest.mark.slow
def test_the_helpers_in_a_two_process_gloo_group(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = door.free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path), q)) for r in (0, 1)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for r in (0, 1):
        o = res[r]
        assert o["info"] == (r, 2, "gloo", "cpu")
        assert o["max"] == 2.0
        assert o["stack"] == [[0, 10], [1, 11]]
        assert o["flat"] == [0.5] * 3 + [1.5] * 3
        assert o["flat_async"] == [0.0] * 3 + [1.0] * 3
        assert o["broadcast"] == [1.0] and o["sum"] == [2.0, 1.0]
        assert o["objects"] == [{"rank": 0}, {"rank": 1}]
        assert "is not the same folder on every rank: ranks [1]" in o["local"]
    assert res[0]["gather"] == [[0.0], [2.0]] and res[1]["gather"] is None


# ---------------------------------------------------------------------------- attention: the xformers probe


def test_head_dims_of_the_unet_configs():
    from pipeline.engine.precision import unet_head_dims

    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8}
    sdxl = {"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20]}
    assert unet_head_dims(sd15) == [40, 80, 160] and unet_head_dims(sdxl) == [64]
    assert unet_head_dims({**sd15, "num_attention_heads": [5, 10, 20, 20]}) == [64]


def test_xformers_is_chosen_only_when_its_probe_passes(monkeypatch, caplog):
    """auto falls back to SDPA with a warning; asking for xformers fails with the probe's reason."""
    import importlib.util

    from pipeline.engine import precision

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else None
    )
    seen = []
    monkeypatch.setattr(precision, "xformers_probe", lambda dev, dt, dims: seen.append((dt, dims)) or None)
    assert precision.resolve_attention("auto", cuda, torch.float16, [40, 80, 160]) == "xformers"
    assert seen == [(torch.float16, [40, 80, 160])]
    assert precision.resolve_attention("auto", torch.device("cpu"), torch.float32, [40]) == "sdpa"
    monkeypatch.setattr(
        precision, "xformers_probe", lambda *a: "NotImplementedError: no kernel for bf16 on sm_70"
    )
    with caplog.at_level("WARNING"):
        assert precision.resolve_attention("auto", cuda, torch.bfloat16, [64]) == "sdpa"
    assert "failed its probe (NotImplementedError: no kernel" in caplog.text
    with pytest.raises(UserError, match="model.attention=xformers but its probe failed .*no kernel"):
        precision.resolve_attention("xformers", cuda, torch.bfloat16, [64])
    assert precision.resolve_attention("sdpa", cuda, torch.float16, [40]) == "sdpa"


def test_the_probe_reports_an_xformers_that_cannot_run_here():
    """On this CPU machine the installed xformers (a CUDA build, or none) cannot run: a reason, not a crash."""
    from pipeline.engine.precision import xformers_probe

    why = xformers_probe(torch.device("cpu"), torch.float32, [40])
    assert why is not None and ":" in why
