"""Under torchrun with 2 ranks: train a few steps with two EMA models while keeping a reference EMA
of the *full* fp32 parameters (gathered with DeepSpeed's safe_get_full_fp32_param); then check that
each rank's shard equals its slice of the reference, that the gathered EMA module equals the
reference, and that the ranks' partitions cover every parameter element exactly once."""

import json
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from pipeline import cli
from pipeline.engine.ema import ShardedEMA
from pipeline.schema.train import TrainConfig
from stages import train

REF: dict = {}


def full_params(engine) -> dict[str, torch.Tensor]:
    return {
        n: safe_get_full_fp32_param(p).detach().clone()
        for n, p in engine.module.named_parameters()
        if p.requires_grad
    }


def main(cfg: TrainConfig) -> int:
    t = train.Trainer(cfg)
    t.setup()
    decays = cfg.ema.all_decays
    start = full_params(t.engine)
    REF.update({k: {n: v.clone() for n, v in start.items()} for k in range(len(decays))})
    real_update = ShardedEMA.update

    def update(self):
        real_update(self)
        cur = full_params(t.engine)
        for k, d in enumerate(decays):
            for n in cur:
                REF[k][n] = d * REF[k][n] + (1 - d) * cur[n]

    ShardedEMA.update = update
    t.train()
    lay, ema = t.layout, t.ema
    ok_shards, ok_module, max_err = True, True, 0.0
    for k in range(len(decays)):
        ref_flats = [torch.zeros(n) for n in lay.padded]
        for g, flat in zip(lay.groups, ref_flats):
            for name, off, shape in zip(g.names, g.offsets, g.shapes):
                flat[off : off + shape.numel()] = REF[k][name].reshape(-1)
        for gi, g in enumerate(lay.groups):
            mine = ref_flats[gi][g.partition * lay.rank : g.partition * (lay.rank + 1)]
            err = (ema.shards[k][gi] - mine).abs().max().item()
            max_err = max(max_err, err)
            ok_shards &= err <= 1e-6
        module = ema.gather(k)
        params = dict(module.named_parameters())
        for name, ref in REF[k].items():
            ok_module &= torch.allclose(params[name].float(), ref, atol=1e-6, rtol=0)
    # the overlapped path: every model's all-gather started first (as the step does), then read back
    ema.invalidate()
    for k in range(len(decays)):
        ema.prefetch(k)
    for k in range(len(decays)):
        params = dict(ema.gather(k).named_parameters())
        for name, ref in REF[k].items():
            ok_module &= torch.allclose(params[name].float(), ref, atol=1e-6, rtol=0)
    # coverage: every element of every parameter is in exactly one rank's partition
    counts = []
    for g in lay.groups:
        cover = torch.zeros(g.partition * lay.world, dtype=torch.int64)
        cover[g.partition * lay.rank : g.partition * (lay.rank + 1)] = 1
        dist.all_reduce(cover)
        elems = torch.cat([torch.arange(o, o + s.numel()) for o, s in zip(g.offsets, g.shapes)])
        counts.append(bool((cover[elems] == 1).all()) and elems.numel() == g.numel)
    if lay.rank == 0:
        print("EMACHECK " + json.dumps({"shards": ok_shards, "module": ok_module, "coverage": all(counts),
                                         "max_err": max_err, "world": lay.world, "steps": t.engine.global_steps,
                                         "buffers": ema.buffers}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("ema_check", TrainConfig, main, sys.argv[1:], "ema check"))
