"""Write tiny, randomly initialised stand-ins of the four reward models, in the folder layouts that
pipeline.evaluate.scorers loads, so tests exercise the real loading and scoring code offline.

    python -m tools.toy.make_tiny_scorers --out DIR [--seed N]

Writes DIR/pickscore, DIR/hpsv2 (CLIPModel + processor), DIR/aesthetic (clip/ + head.safetensors),
DIR/imagereward (blip/ + head.safetensors). Their scores mean nothing; their shapes and code paths
are the real ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.evaluate.scorers import MLPHead
from tools.toy.make_tiny_model import write_tokenizer
from tools.toy.vocabulary import WORDS


def _clip_processor(tok_dir: Path):
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPProcessor(image_processor=image, tokenizer=CLIPTokenizer.from_pretrained(tok_dir))


# the vision tower of every tiny stand-in (CLIP for PickScore / HPSv2 / aesthetic, BLIP for ImageReward)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def _clip(vocab: int):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        ),
        vision_config=dict(TINY_VISION),
        projection_dim=16,
    )
    return CLIPModel(cfg)


def _bert_vocab(path: Path) -> None:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789,.") + [
        f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"
    ]
    path.write_text("\n".join(specials + WORDS + letters) + "\n")


def make_tiny_scorers(out: str | Path, seed: int = 0) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    out = Path(out)
    torch.manual_seed(seed)
    tok_dir = out / "_tokenizer"
    write_tokenizer(tok_dir)
    vocab = len(CLIPTokenizer.from_pretrained(tok_dir))
    for name in ("pickscore", "hpsv2"):
        _clip(vocab).save_pretrained(out / name)
        _clip_processor(tok_dir).save_pretrained(out / name)
    a = out / "aesthetic"
    vis = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION, projection_dim=16))
    vis.save_pretrained(a / "clip")
    _clip_processor(tok_dir).image_processor.save_pretrained(a / "clip")
    save_file(MLPHead(16).state_dict(), str(a / "head.safetensors"))
    r = out / "imagereward"
    (r / "blip").mkdir(parents=True, exist_ok=True)
    _bert_vocab(r / "blip" / "vocab.txt")
    bert = BertTokenizer(str(r / "blip" / "vocab.txt"))
    blip_cfg = BlipConfig(
        vision_config=dict(TINY_VISION),
        text_config=dict(
            vocab_size=len(bert),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            bos_token_id=5,
            sep_token_id=3,
            pad_token_id=0,
        ),
        projection_dim=16,
        image_text_hidden_size=16,
    )
    BlipForImageTextRetrieval(blip_cfg).save_pretrained(r / "blip")
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=bert
    ).save_pretrained(r / "blip")
    save_file(MLPHead(32).state_dict(), str(r / "head.safetensors"))
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.toy.make_tiny_scorers", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"wrote tiny scorers to {make_tiny_scorers(a.out, a.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
