"""Each reward model's score against a computation written out here from its published definition
(not just its shape): HPSv2 = 100 * cos(image, text) with the CLIP towers and projections, the LAION
aesthetic score = the MLP head on the L2-normalised projected image embedding, ImageReward = the MLP
head on the BLIP text encoder's [CLS] state cross-attending to the image, standardised by the
published mean and std. The tiny stand-ins come from tools.toy.make_tiny_scorers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from pipeline.evaluate.scorers import build_scorers
from pipeline.schema.evaluate import EvalScorers

PROMPTS = ["a red cat", "a blue house", "a tiny green robot"]


@pytest.fixture(scope="module")
def scorers_dir(tmp_path_factory):
    from tools.toy.make_tiny_scorers import make_tiny_scorers

    return make_tiny_scorers(tmp_path_factory.mktemp("scorers"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]


def _score(scorers_dir, name: str, images) -> np.ndarray:
    (s,), _ = build_scorers(
        EvalScorers(**{name: str(scorers_dir / name)}), torch.device("cpu"), torch.float32
    )
    return s.score(images, PROMPTS)


def _head(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The LAION / ImageReward MLP in eval mode: Linear 0, 2, 4, 6, 7 in sequence, no activations."""
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x.squeeze(-1)


def test_hpsv2_is_100_times_the_cosine(scorers_dir, images):
    from transformers import AutoProcessor, CLIPModel

    d = scorers_dir / "hpsv2"
    m, proc = CLIPModel.from_pretrained(d).eval(), AutoProcessor.from_pretrained(d)
    with torch.no_grad():
        px = proc(images=images, return_tensors="pt")["pixel_values"]
        tx = proc(text=PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        i = m.vision_model(pixel_values=px).pooler_output @ m.visual_projection.weight.T
        t = m.text_model(**tx).pooler_output @ m.text_projection.weight.T
        want = 100 * F.cosine_similarity(i, t)
    got = _score(scorers_dir, "hpsv2", images)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4)
    # the scale is 100, not the model's logit scale (the PickScore reading)
    assert not np.isclose(m.logit_scale.exp().item(), 100.0)


def test_aesthetic_is_the_head_on_the_normalised_embedding(scorers_dir, images):
    from transformers import AutoProcessor, CLIPVisionModelWithProjection

    d = scorers_dir / "aesthetic"
    clip = CLIPVisionModelWithProjection.from_pretrained(d / "clip").eval()
    proc = AutoProcessor.from_pretrained(d / "clip")
    with torch.no_grad():
        px = proc(images=images, return_tensors="pt")["pixel_values"]
        v = clip.vision_model(pixel_values=px).pooler_output @ clip.visual_projection.weight.T
        want = _head(load_file(str(d / "head.safetensors")), v / v.norm(dim=-1, keepdim=True))
    got = _score(scorers_dir, "aesthetic", images)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert np.ptp(got) > 0  # different images, different scores


def test_imagereward_is_the_standardised_head_on_the_cls_state(scorers_dir, images):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from pipeline.evaluate.scorers import IMAGEREWARD_MEAN, IMAGEREWARD_STD

    d = scorers_dir / "imagereward"
    blip = BlipForImageTextRetrieval.from_pretrained(d / "blip").eval()
    proc = BlipProcessor.from_pretrained(d / "blip")
    with torch.no_grad():
        px = proc(images=images, return_tensors="pt")["pixel_values"]
        tx = proc.tokenizer(
            PROMPTS, padding="max_length", max_length=35, truncation=True, return_tensors="pt"
        )
        img = blip.vision_model(pixel_values=px).last_hidden_state
        cls = blip.text_encoder(
            input_ids=tx["input_ids"], attention_mask=tx["attention_mask"], encoder_hidden_states=img
        ).last_hidden_state[:, 0]
        raw = _head(load_file(str(d / "head.safetensors")), cls)
    got = _score(scorers_dir, "imagereward", images)
    np.testing.assert_allclose(
        got, ((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).numpy(), rtol=1e-5, atol=1e-5
    )
    # the prompt matters: the same images under other prompts score differently
    (s,), _ = build_scorers(EvalScorers(imagereward=str(d)), torch.device("cpu"), torch.float32)
    assert not np.allclose(s.score(images, PROMPTS[::-1]), got)
