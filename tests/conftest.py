"""Shared fixtures: tiny models and a small Pick-a-Pic-format data set, built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    from tools.make_tiny_model import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("models") / "sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from tools.make_tiny_model import make_tiny_model

    return make_tiny_model("sdxl", tmp_path_factory.mktemp("models") / "sdxl", seed=0)


@pytest.fixture(scope="session")
def pickapic_dir(tmp_path_factory):
    """120 rows in 3 files, with ties, unlabelled and identical rows and one bad row of each kind."""
    from tools.make_pickapic import make_rows, write_parquet

    out = tmp_path_factory.mktemp("pickapic")
    rows = make_rows(120, seed=1, corrupt=1, truncated=1, empty=1, null_caption=1)
    write_parquet(rows, out, rows_per_file=50)
    return out


def encode_args(model, source, out, *extra):
    return ["--config", "configs/encode/tiny.yaml", f"model.path={model}", f"data.source={source}", f"output.dir={out}",
            "output.shard_size=16", *extra]  # fmt: skip
