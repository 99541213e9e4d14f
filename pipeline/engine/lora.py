"""LoRA runs: the adapters' config (``model.lora_*``) and the reference, which is the policy's own
module with its adapters disabled (no second copy of the UNet)."""

from __future__ import annotations

import contextlib

from pipeline.schema.train import TrainModel


def lora_config(m: TrainModel, init: str | bool = "gaussian"):
    """peft's LoraConfig of ``model.lora_*``; None for full fine-tuning."""
    if not m.lora_rank:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=m.lora_rank,
        lora_alpha=m.lora_alpha or m.lora_rank,
        init_lora_weights=init,
        target_modules=list(m.lora_targets),
    )


@contextlib.contextmanager
def adapters_disabled(module):
    """LoRA: the reference is the same UNet with its adapters off."""
    module.disable_adapters()
    try:
        yield module
    finally:
        module.enable_adapters()


class LoraReference:
    """Callable reference for LoRA runs: the policy's own module with adapters disabled."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.module):
            return self.module(*args, **kwargs)
