"""Write a tiny, randomly initialised Stable Diffusion folder (diffusers layout) for tests and the demo.

    python -m tools.toy.make_tiny_model --family sd15|sdxl --out DIR [--seed N] [--vae-steps N]

The folder loads offline with ``StableDiffusionPipeline.from_pretrained(DIR)`` (sd15) or
``StableDiffusionXLPipeline.from_pretrained(DIR)`` (sdxl). Shapes are real-model shapes scaled
down: the VAE downsamples by 8 like SD's (64 px images -> 4x8x8 latents), text states are
[77, D]. The tokenizer is a real CLIP BPE tokenizer over a vocabulary built here.

``--vae-steps N`` first trains the tiny VAE for N steps as an autoencoder on synthetic toy images and
sets ``scaling_factor`` to 1 / std of the latents, as Stable Diffusion's 0.18215 was chosen: without
it a random VAE's latents are nearly constant (std ~0.06 with SD's factor) and a UNet cannot see
the images, so no preference is learnable. Tests that only exercise code paths use 0 (fast).

Deterministic for a seed: the same seed writes byte-identical weights at any thread count, idle or
loaded. Random initialisation is exact everywhere; the VAE training is not (a float sum's order
follows the thread count and the CPU's vector kernels, and 300 Adam steps turn a last-bit difference
into another model: its scaling factor moved from 0.806 to 0.819 between 1 and 2 threads). So it runs
in a child process pinned to one thread and, on x86-64, to AVX2 kernels (``REPRODUCIBLE_ENV``): the
same bytes with or without AVX512 / AMX on one host (tested) and, as far as the libraries promise,
on other x86-64 hosts (MKL's conditional numerical reproducibility; oneDNN's blocking can follow the
cache sizes, so not guaranteed). aarch64 hosts build their own, also thread-independent, VAE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tools.toy.vocabulary import WORDS

TEXT_DIM = 32  # hidden size of each tiny text encoder
RESOLUTION = 64  # default image size the tiny model is built for


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map (the base alphabet of the BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_clip_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: every byte symbol (plain and word-final ``</w>``), then left-to-right
    merges that assemble each word of ``words``, then the two special tokens. Unknown words still
    tokenize (down to single symbols), as with the real CLIP vocabulary."""
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [a + "</w>" for a in alphabet]
    merges: list[str] = []
    seen = set(vocab_list)
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for sym in symbols[1:]:
            merge = f"{cur} {sym}"
            cur = cur + sym
            if cur not in seen:
                merges.append(merge)
                vocab_list.append(cur)
                seen.add(cur)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer(out: Path) -> None:
    from transformers import CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_bpe(WORDS)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    tok.save_pretrained(out)


def _text_config(vocab_size: int, projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM if projection else 512,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _vae():
    from diffusers import AutoencoderKL

    # four levels like SD's VAE: downsampling by 8
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        scaling_factor=0.18215,
    )


def _toy_images(n: int, seed: int) -> torch.Tensor:
    """[n, 3, 64, 64] in [-1, 1]: images of the toy world (tools.toy.make_pickapic), resized and cropped."""
    import numpy as np

    from pipeline.data.images import prepare
    from tools.toy.make_pickapic import _size, draw_image
    from tools.toy.vocabulary import COLOURS

    rng = np.random.default_rng(seed)
    px = [
        prepare(draw_image(rng, COLOURS[i % len(COLOURS)], _size(rng, 64, 128)), RESOLUTION).pixels
        for i in range(n)
    ]
    return torch.from_numpy(np.stack(px))


def train_vae(vae, steps: int, seed: int) -> float:
    """Autoencoder training (reconstruction + a small KL, as SD's VAE) on toy images; then returns
    the scaling factor 1 / std of the latent means."""
    g = torch.Generator().manual_seed(seed)
    data = _toy_images(512, seed)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    vae.train()
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (32,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        loss = (vae.decode(z).sample - x).pow(2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        return float(1.0 / vae.encode(data[:256]).latent_dist.mean.std())


# The child process that trains the VAE: one thread; on x86-64 the AVX2 kernels of ATen, oneDNN and
# MKL (with MKL's reproducibility mode) whatever the CPU offers beyond them. Read by the libraries when
# they start, hence a process of its own. Measured here (60 steps): 24 s pinned on one thread, 34 s
# unpinned on one thread, 20 s unpinned on two.
REPRODUCIBLE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
if platform.machine().lower() in ("x86_64", "amd64"):
    REPRODUCIBLE_ENV |= {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def train_vae_reproducibly(vae, steps: int, seed: int) -> float:
    """``train_vae`` in a child process under ``REPRODUCIBLE_ENV``; ``vae`` gets the trained weights.
    Returns the scaling factor."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix="tiny_vae_") as tmp:
        start, trained = Path(tmp) / "start.safetensors", Path(tmp) / "trained.safetensors"
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(start))
        env = dict(os.environ, **REPRODUCIBLE_ENV)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")])
        )
        cmd = [
            sys.executable,
            "-m",
            "tools.toy.make_tiny_model",
            "--train-vae",
            str(start),
            str(trained),
            "--seed",
            str(seed),
            "--vae-steps",
            str(steps),
            "--family",
            "sd15",
            "--out",
            tmp,
        ]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"training the tiny VAE failed:\n{p.stderr[-3000:]}")
        vae.load_state_dict(load_file(str(trained)))
        return float(p.stdout.strip().splitlines()[-1])


def _train_vae_child(start: str, trained: str, steps: int, seed: int) -> None:
    from safetensors.torch import load_file, save_file

    vae = _vae()
    vae.load_state_dict(load_file(start))
    scale = train_vae(vae, steps, seed)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, trained)
    print(repr(scale))


def make_tiny_model(family: str, out: str | Path, seed: int = 0, vae_steps: int = 0) -> Path:
    from diffusers import (
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out)
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"family must be sd15 or sdxl, got {family!r}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok_dir = out / "_tokenizer_build"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    vocab_size = len(tokenizer)
    latent = RESOLUTION // 8
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,  # as in SD1.5's published scheduler config
    )
    vae = _vae()
    # as the real VAEs behave: SDXL's overflows in fp16 (its config says force_upcast), SD1.5's runs in fp16
    # (its config predates the key; diffusers' default, true, would upcast it)
    vae.register_to_config(force_upcast=family == "sdxl")
    if vae_steps:
        vae.register_to_config(scaling_factor=round(train_vae_reproducibly(vae, vae_steps, seed), 5))
    common = dict(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=16,
    )
    if family == "sd15":
        unet = UNet2DConditionModel(cross_attention_dim=TEXT_DIM, **common)
        text_encoder = CLIPTextModel(_text_config(vocab_size, projection=False))
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        time_dim = 8
        unet = UNet2DConditionModel(
            cross_attention_dim=2 * TEXT_DIM,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + TEXT_DIM,
            use_linear_projection=True,
            transformer_layers_per_block=(1, 1),
            **common,
        )
        text_encoder = CLIPTextModel(_text_config(vocab_size, projection=False))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, projection=True))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    pipe.save_pretrained(out, safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.toy.make_tiny_model", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--family", choices=["sd15", "sdxl"], required=True)
    p.add_argument("--out", required=True, help="output folder (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vae-steps", type=int, default=0, help="train the tiny VAE as an autoencoder first (see above)"
    )
    p.add_argument("--train-vae", nargs=2, metavar=("START", "TRAINED"), help=argparse.SUPPRESS)  # the child
    args = p.parse_args(argv)
    if args.train_vae:
        _train_vae_child(*args.train_vae, args.vae_steps, args.seed)
        return 0
    out = make_tiny_model(args.family, args.out, args.seed, args.vae_steps)
    print(f"wrote tiny {args.family} model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
