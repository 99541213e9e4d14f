"""Run stages.train, then check from inside the process what the outside cannot see; print one JSON
line: the reference UNet bit-identical to the starting one, the LoRA reference equal to the base."""

import json
import sys

import torch

from pipeline import cli
from pipeline.engine.lora import LoraReference
from pipeline.models import load_unet
from pipeline.schema.train import TrainConfig
from stages import train


def main(cfg: TrainConfig) -> int:
    t = train.Trainer(cfg)
    t.setup()
    rc = t.train()
    if cfg.checkpoint.export:
        t.export()
    report = {"rc": rc, "steps": t.engine.global_steps}
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    tt = torch.tensor([10, 500])
    txt = torch.randn(2, 77, 32)
    base = load_unet(t.info.path).eval()
    with torch.no_grad():
        want = base(x, tt, encoder_hidden_states=txt).sample
        if isinstance(t.reference, LoraReference):
            got = t.reference(x, tt, encoder_hidden_states=txt).sample
            report["lora_reference_equals_base"] = bool(torch.equal(got, want))
            policy = t.engine.module(x, tt, encoder_hidden_states=txt).sample
            report["lora_policy_differs"] = not bool(torch.equal(policy, want))  # adapters back on
        else:
            fresh = base.state_dict()
            ref = t.reference.state_dict()
            report["reference_identical"] = set(ref) == set(fresh) and all(
                torch.equal(ref[k], fresh[k]) for k in fresh
            )
    print("PROBE " + json.dumps(report))
    t.cleanup()
    return rc


if __name__ == "__main__":
    sys.exit(cli.run("train_probe", TrainConfig, main, sys.argv[1:], "probe"))
