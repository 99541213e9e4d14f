"""Convert an open_clip ViT checkpoint (e.g. HPS v2's ``HPS_v2_compressed.pt``, ViT-H-14) into a
transformers ``CLIPModel`` folder that ``scorers.hpsv2`` loads.

    python -m tools.convert_openclip --checkpoint HPS_v2_compressed.pt --processor /weights/CLIP-ViT-H-14 --out /weights/hpsv2

The checkpoint is read with ``torch.load(weights_only=True)`` (a plain state dict, optionally under
``state_dict``); open_clip itself is not needed. Sizes are read from the weights; the head counts
(not visible in the weights) default to ViT-H-14's (16 and 16). ``--processor`` is a CLIP processor
folder (tokenizer + image processor) matching the model, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch


def _blocks(sd: dict, prefix: str) -> int:
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k)))


def _tower(sd: dict, src: str, dst: str, n: int, out: dict) -> None:
    for i in range(n):
        s, d = f"{src}{i}.", f"{dst}{i}."
        q, k, v = sd[s + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[s + "attn.in_proj_bias"].chunk(3)
        out.update(
            {
                d + "self_attn.q_proj.weight": q,
                d + "self_attn.k_proj.weight": k,
                d + "self_attn.v_proj.weight": v,
                d + "self_attn.q_proj.bias": qb,
                d + "self_attn.k_proj.bias": kb,
                d + "self_attn.v_proj.bias": vb,
            }
        )
        pairs = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for a, b in pairs.items():
            out[d + b + ".weight"] = sd[s + a + ".weight"]
            out[d + b + ".bias"] = sd[s + a + ".bias"]


def convert_state_dict(sd: dict, vision_heads: int = 16, text_heads: int = 16, act: str = "gelu"):
    """open_clip ViT state dict -> (transformers CLIPConfig, CLIPModel state dict)."""
    from transformers import CLIPConfig

    vw = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    tw = sd["token_embedding.weight"].shape[1]
    nv, nt = _blocks(sd, "visual.transformer.resblocks."), _blocks(sd, "transformer.resblocks.")
    cfg = CLIPConfig(
        vision_config=dict(
            hidden_size=vw,
            intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=nv,
            num_attention_heads=vision_heads,
            image_size=grid * patch,
            patch_size=patch,
            hidden_act=act,
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            vocab_size=sd["token_embedding.weight"].shape[0],
            hidden_size=tw,
            intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=nt,
            num_attention_heads=text_heads,
            max_position_embeddings=sd["positional_embedding"].shape[0],
            hidden_act=act,
            layer_norm_eps=1e-5,
        ),
        projection_dim=sd["visual.proj"].shape[1],
    )
    out = {
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    _tower(sd, "visual.transformer.resblocks.", "vision_model.encoder.layers.", nv, out)
    _tower(sd, "transformer.resblocks.", "text_model.encoder.layers.", nt, out)
    return cfg, out


def convert(
    checkpoint: str, processor: str, out: str, vision_heads: int = 16, text_heads: int = 16, act: str = "gelu"
) -> Path:
    from transformers import AutoProcessor, CLIPModel

    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    cfg, state = convert_state_dict(sd, vision_heads, text_heads, act)
    model = CLIPModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"conversion incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(processor).save_pretrained(out)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.convert_openclip", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--processor", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vision-heads", type=int, default=16)
    p.add_argument("--text-heads", type=int, default=16)
    p.add_argument(
        "--act",
        default="gelu",
        help="gelu for open_clip ViT-H-14 (HPS v2); quick_gelu for OpenAI-trained ViTs",
    )
    a = p.parse_args(argv)
    print(f"wrote {convert(a.checkpoint, a.processor, a.out, a.vision_heads, a.text_heads, a.act)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
