"""Shared fixtures: tiny models and a small Pick-a-Pic-format data set, built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# The fast tier (`make test-fast`: -m "not slow") promises no subprocesses and no servers. While it runs,
# a test that is not marked slow and starts a process (subprocess, multiprocessing, os.fork / spawn) or
# listens on a socket fails, in its setup (fixtures included), call or teardown, even where the code
# under test catches the error. (A C++ listener such as torch.distributed's TCPStore is not seen.)
_GUARD: dict = {"item": None, "hits": []}


def _fast_tier(config) -> bool:
    return "not slow" in (config.getoption("markexpr") or "")


def _guarded(what: str, real):
    def check(*args, **kwargs):
        item = _GUARD["item"]
        if item is not None:
            msg = (
                f"{item.nodeid} {what} in the fast tier (-m 'not slow' promises no subprocesses and no "
                "servers): mark the test @pytest.mark.slow"
            )
            _GUARD["hits"].append(msg)
            raise RuntimeError(msg)
        return real(*args, **kwargs)

    check.__wrapped__ = real
    return check


def pytest_configure(config):
    if not _fast_tier(config):
        return
    import multiprocessing.process
    import socket
    import subprocess

    subprocess.Popen._execute_child = _guarded("started a subprocess", subprocess.Popen._execute_child)
    multiprocessing.process.BaseProcess.start = _guarded(
        "started a multiprocessing process", multiprocessing.process.BaseProcess.start
    )
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            setattr(os, name, _guarded(f"called os.{name}", getattr(os, name)))
    socket.socket.listen = _guarded("opened a listening socket", socket.socket.listen)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    armed = _fast_tier(item.config) and item.get_closest_marker("slow") is None
    _GUARD["item"], _GUARD["hits"] = (item if armed else None), []
    try:
        return (yield)
    finally:
        _GUARD["item"] = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if _GUARD["hits"] and not report.failed:  # the code under test caught the error, or skipped on it
        report.outcome, report.longrepr = "failed", "\n".join(dict.fromkeys(_GUARD["hits"]))
    _GUARD["hits"] = []  # reported once, in the phase (setup, call, teardown) that spawned
    return report


# Parallel runs (`make test`: pytest-xdist, --dist loadfile --no-loadscope-reorder). A file's tests form one
# unit on one worker, so its module fixtures are built once; the files in SPREAD use session fixtures
# only and their tests go one by one to whichever worker is free. Units start longest first (LONG_FIRST,
# measured with --durations), so that no worker begins a four-minute file while the other is finishing.
# (xdist's own --dist loadgroup cannot do this under pytest 9: it renames items through a removed attribute.)
SPREAD = {"test_train.py", "test_noise_model.py", "test_tools.py"}
LONG_FIRST = (
    "test_gpu_check.py",
    "test_online.py",
    "test_online_human.py",
    "test_fp16.py",
    "test_evaluate.py",
    "test_label_loop.py",
    "test_d3po_train.py",
    "test_train.py",
    "test_noise_model.py",
)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist runs the suite serially
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None  # xdist's own
    from xdist.scheduler import LoadFileScheduling

    class FilesOrSpread(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path.rsplit("/", 1)[-1] in SPREAD else path

    return FilesOrSpread(config, log)


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker: the controller schedules in this order
        rank = {name: i for i, name in enumerate(LONG_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: file order kept


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    from tools.toy.make_tiny_model import make_tiny_model

    return make_tiny_model("sd15", tmp_path_factory.mktemp("models") / "sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from tools.toy.make_tiny_model import make_tiny_model

    return make_tiny_model("sdxl", tmp_path_factory.mktemp("models") / "sdxl", seed=0)


@pytest.fixture(scope="session")
def pickapic_dir(tmp_path_factory):
    """120 rows in 3 files, with ties, unlabelled and identical rows and one bad row of each kind."""
    from tools.toy.make_pickapic import make_rows, write_parquet

    out = tmp_path_factory.mktemp("pickapic")
    rows = make_rows(120, seed=1, corrupt=1, truncated=1, empty=1, null_caption=1)
    write_parquet(rows, out, rows_per_file=50)
    return out


def encode_args(model, source, out, *extra):
    return [
        "--config",
        "configs/encode/tiny.yaml",
        f"model.path={model}",
        f"data.source={source}",
        f"output.dir={out}",
        "output.shard_size=16",
        *extra,
    ]


def _encode_clean(model, tmp_path_factory, name: str, pairs: int, seed: int, shard_size: int):
    """Pairs without ties or unlabelled rows, so the shard counts are exact."""
    from stages.encode import cli_main
    from tools.toy.make_pickapic import make_rows, write_parquet

    src = tmp_path_factory.mktemp(f"{name}_src")
    write_parquet(
        make_rows(pairs, seed=seed, tie_rate=0, unlabelled_rate=0, identical_rate=0), src, rows_per_file=64
    )
    out = tmp_path_factory.mktemp(name)
    assert cli_main(encode_args(model, src, out, f"output.shard_size={shard_size}")) == 0
    return out


@pytest.fixture(scope="session")
def shards16(tiny_sd15, tmp_path_factory):
    """16 pairs in one shard: a pair set the tiny model can learn in a few steps."""
    return _encode_clean(tiny_sd15, tmp_path_factory, "shards16", 16, 6, 16)


@pytest.fixture(scope="session")
def shards64(tiny_sd15, tmp_path_factory):
    """64 pairs in 4 shards of 16."""
    return _encode_clean(tiny_sd15, tmp_path_factory, "shards64", 64, 5, 16)


@pytest.fixture(scope="session")
def shards_xl(tiny_sdxl, tmp_path_factory):
    return _encode_clean(tiny_sdxl, tmp_path_factory, "shards_xl", 16, 7, 16)
