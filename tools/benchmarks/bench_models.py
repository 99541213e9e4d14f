"""Randomly initialised modules with the public SD1.5 shapes (optionally narrower), built in memory.

Widths scale the UNet's channels (``width=1.0`` is SD1.5's 320/640/1280/1280, 860M parameters);
the VAE and CLIP-L text encoder are the full public shapes. No weights are downloaded or written.
"""

from __future__ import annotations


def sd15_unet(width: float = 1.0, sample_size: int = 64):
    from diffusers import UNet2DConditionModel

    ch = tuple(int(round(c * width / 32)) * 32 for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=ch,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def sdxl_unet(width: float = 1.0, sample_size: int = 128):
    """SDXL's public UNet config (2.57B parameters at width 1.0); narrower widths scale the channels
    and the head counts alike (the head dim stays 64 where it divides)."""
    from diffusers import UNet2DConditionModel

    ch = tuple(max(32, int(round(c * width / 32)) * 32) for c in (320, 640, 1280))
    heads = tuple(h if width == 1.0 else max(1, round(h * width)) for h in (5, 10, 20))
    heads = tuple(h if c % h == 0 else 1 for c, h in zip(ch, heads))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=ch,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=heads,
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 size/crop ids x 256 + the 1280-d pooled text
        norm_num_groups=32,
    )


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )


def clip_l_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        )
    )


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
