"""tools.studies.d3po_study expressivity: reads a reward study's round-0 samples and says whether the
reward (brightness) follows a linear direction of the final latents, from synthetic samples whose answer
is known."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from tools.studies.d3po_study import expressivity


def _study(root, linear: bool, groups: int = 60):
    rng = np.random.default_rng(0)
    shard = root / "runs" / "brightness_s0" / "round_000" / "sample"
    shard.mkdir(parents=True)
    with tarfile.open(shard / "shard-000000.tar", "w") as t:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

        for g in range(groups):
            lat = rng.normal(0, 1, (2, 3, 4, 4, 4)).astype(np.float16)  # K, N+1, C, h, w
            buf = io.BytesIO()
            np.save(buf, lat)
            add(f"k{g:03d}.latents.npy", buf.getvalue())
            for i in range(2):
                level = (
                    128 + 60 * float(lat[i, -1, 0].astype(np.float64).mean())
                    if linear
                    else rng.uniform(68, 188)
                )
                img = Image.new("RGB", (16, 16), (int(round(level)),) * 3)
                jpg = io.BytesIO()
                img.save(jpg, format="JPEG", quality=95)
                add(f"k{g:03d}.img{i}.jpg", jpg.getvalue())
    return root


def test_expressivity_finds_a_reward_on_a_latent_direction_and_none_where_there_is_none(tmp_path):
    lin = expressivity(_study(tmp_path / "lin", linear=True))
    assert lin["images"] == 120 and lin["groups"] == 60
    assert lin["r2_channel_means"] > 0.95 and lin["r2_within_pairs"] > 0.95
    assert json.loads((tmp_path / "lin" / "expressivity.json").read_text()) == lin
    noise = expressivity(_study(tmp_path / "noise", linear=False))
    assert noise["r2_channel_means"] < 0.2 and noise["r2_within_pairs"] < 0.2
    assert noise["best_of_k_gap_mean"] > 0.05  # the samples differ in brightness: not along the latents
    with pytest.raises(SystemExit, match="no samples"):
        expressivity(tmp_path / "empty")
