"""Export: the per-chunk stream of rank slices to rank 0 equals the all-gather it replaced (real gloo
processes, chunks that cut parameters and rank boundaries anywhere), and a LoRA state whose names do
not match the adapters is refused instead of exporting the initial LoRA weights."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.engine.dist import free_port
from pipeline.engine.flat_layout import FlatLayout, GroupLayout


@dataclass
class _Layout:
    """What ``stream_to_rank0`` reads of a ``FlatLayout``: the groups, the world and this rank."""

    groups: list[GroupLayout]
    world: int
    rank: int

    # the all-gather the export used before (a FlatLayout method), as the oracle
    gather_into = FlatLayout.gather_into
    state_dict = FlatLayout.state_dict

    @property
    def padded(self) -> list[int]:
        return [g.partition * self.world for g in self.groups]


def _layout(world: int, rank: int) -> _Layout:
    """Two groups like ZeRO-2's: parameters packed from offset 0, the flat padded at the end only."""
    groups = []
    for shapes in ([(3, 5), (7,), (2, 2, 3), (1,), (11,)], [(4, 4), (9,)]):
        names, offsets, off = [], [], 0
        for i, s in enumerate(shapes):
            names.append(f"g{len(groups)}.p{i}")
            offsets.append(off)
            off += torch.Size(s).numel()
        part = -(-(off + 3) // world)  # some padding at the end
        groups.append(GroupLayout(names, offsets, [torch.Size(s) for s in shapes], off, part))
    return _Layout(groups, world, rank)


def _worker(rank: int, world: int, port: int, q) -> None:
    import torch.distributed as dist

    from pipeline.export import stream_to_rank0

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lay = _layout(world, rank)
    g = torch.Generator().manual_seed(0)
    fulls = [torch.randn(n, generator=g, dtype=torch.float64) for n in lay.padded]  # same on every rank
    parts = [f[rank * gl.partition : (rank + 1) * gl.partition].clone() for f, gl in zip(fulls, lay.groups)]
    flats = [torch.zeros(n) for n in lay.padded]
    lay.gather_into(parts, flats)
    want = {n: t.clone() for n, t in lay.state_dict(flats).items()}
    ok = {}
    for chunk in (1, 4, 7, 1 << 22):
        dest = {n: torch.full(t.shape, float("nan")) for n, t in want.items()} if rank == 0 else None
        stream_to_rank0(lay, parts, dest, torch.device("cpu"), chunk=chunk)
        ok[chunk] = rank != 0 or all(torch.equal(dest[n], want[n]) for n in want)
    q.put((rank, ok))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_streaming_to_rank0_equals_the_all_gather(world):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert res[0] == {1: True, 4: True, 7: True, 1 << 22: True}


def test_streaming_on_one_rank_copies_every_parameter():
    from pipeline.export import stream_to_rank0

    lay = _layout(1, 0)
    parts = [torch.arange(n, dtype=torch.float32) for n in lay.padded]
    dest = {n: torch.zeros(s) for gl in lay.groups for n, s in zip(gl.names, gl.shapes)}
    stream_to_rank0(lay, parts, dest, torch.device("cpu"), chunk=5)
    for gl, p in zip(lay.groups, parts):
        for n, off, s in zip(gl.names, gl.offsets, gl.shapes):
            assert torch.equal(dest[n], p[off : off + s.numel()].view(s))
    with pytest.raises(ValueError, match="dest on rank 0 only"):
        stream_to_rank0(lay, parts, None, torch.device("cpu"))


def test_lora_export_refuses_names_that_do_not_match_the_adapters(tiny_sd15, tmp_path):
    from peft import LoraConfig

    from pipeline.export import export_lora
    from pipeline.models import load_unet

    cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    unet = load_unet(tiny_sd15, torch.float32)
    unet.requires_grad_(False)
    unet.add_adapter(cfg)  # the training module: the names the layout records
    state = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    assert state and all("lora_" in n for n in state)

    out = export_lora(state, str(tiny_sd15), cfg, "StableDiffusionPipeline", tmp_path / "ok")
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    first = next(iter(state))
    renamed = dict(state)
    renamed[first.replace("lora_A", "lora_Z")] = renamed.pop(first)
    with pytest.raises(RuntimeError, match="1 LoRA parameters missing") as e:
        export_lora(renamed, str(tiny_sd15), cfg, "StableDiffusionPipeline", tmp_path / "renamed")
    assert first in str(e.value) and "lora_Z" in str(e.value)
    assert not (tmp_path / "renamed").exists()  # nothing written

    dropped = dict(state)
    dropped.pop(first)
    with pytest.raises(RuntimeError, match=first.replace(".", r"\.")):
        export_lora(dropped, str(tiny_sd15), cfg, "StableDiffusionPipeline", tmp_path / "dropped")
