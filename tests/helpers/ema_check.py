"""Under torchrun with 2 ranks: train a few steps with two EMA models while keeping a reference EMA
of the *full* fp32 parameters (gathered with DeepSpeed's safe_get_full_fp32_param); then check that
each rank's shard equals its slice of the reference, that the gathered EMA module equals the
reference, and that the ranks' partitions cover every parameter element exactly once (checked
against DeepSpeed's own gather). Every rank prints its result."""

import json
import os
import sys

import torch
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
    # coverage, against DeepSpeed's own fragment mapping rather than the layout's formula: each rank
    # fills its fp32 master partition with rank + 1, DeepSpeed gathers each full parameter, and every
    # element must hold the owner the layout predicts (so each element lives in exactly one partition)
    for flat in t.engine.optimizer.single_partition_of_fp32_groups:
        flat.data.fill_(lay.rank + 1)
    params = dict(t.engine.module.named_parameters())
    coverage = True
    for g in lay.groups:
        for name, off, shape in zip(g.names, g.offsets, g.shapes):
            owner = safe_get_full_fp32_param(params[name]).reshape(-1).round().long() - 1
            want = torch.div(torch.arange(off, off + shape.numel()), g.partition, rounding_mode="floor")
            coverage &= bool(torch.equal(owner, want))
    # every rank reports, so a wrong shard on rank 1 fails the test too; one write() per line, so the
    # ranks' lines never interleave in the shared pipe (print writes the text and the newline apart)
    line = f"EMACHECK {lay.rank} " + json.dumps(
        {
            "shards": ok_shards,
            "module": ok_module,
            "coverage": coverage,
            "max_err": max_err,
            "world": lay.world,
            "steps": t.engine.global_steps,
            "buffers": ema.buffers,
        }
    )
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("ema_check", TrainConfig, main, sys.argv[1:], "ema check"))
