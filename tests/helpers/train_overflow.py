"""stages.train whose gradients overflow at the optimizer steps listed in OVERFLOW_AT_STEPS
(comma-separated, 1-based): a hook on one policy parameter makes its gradient infinite on every
micro-step of those steps, on every rank. An fp16 overflow is then certain where the test wants it, on
any CPU, instead of depending on whether the host's fp16 kernels happen to overflow at some loss scale
(they do not agree: AVX512-FP16 hosts overflow later than others)."""

import os
import sys

import torch

from stages import train


def install_overflow(steps: set[int]) -> None:
    setup = train.Trainer.setup

    def setup_with_overflow(self) -> None:
        setup(self)
        engine = self.engine
        param = next(p for p in engine.module.parameters() if p.requires_grad)

        def poison(grad: torch.Tensor) -> torch.Tensor:
            # global_steps counts skipped steps too: this micro-step belongs to step global_steps + 1
            return torch.full_like(grad, float("inf")) if engine.global_steps + 1 in steps else grad

        param.register_hook(poison)  # runs before DeepSpeed's gradient accumulation hooks see the gradient

    train.Trainer.setup = setup_with_overflow


if __name__ == "__main__":
    install_overflow({int(s) for s in os.environ["OVERFLOW_AT_STEPS"].split(",")})
    sys.exit(train.cli_main(sys.argv[1:]))
