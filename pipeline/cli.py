"""The command line every stage shares: ``--config FILE key=value ...``, errors to exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from pipeline.config import load_config
from pipeline.errors import UserError

T = TypeVar("T")
log = logging.getLogger("pipeline")


def parse_args(prog: str, argv: list[str] | None, description: str) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. model.path=/models/sd15"
    )
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK is in the environment too
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    return args.config, list(unknown) + list(args.overrides)


def run(
    prog: str, cfg_cls: type[T], main: Callable[[T], int | None], argv: list[str] | None, description: str
) -> int:
    """Parse, validate (all errors at once, before any model loads), run ``main``; user errors exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path, overrides = parse_args(prog, argv, description)
        cfg = load_config(cfg_cls, path, overrides)
        return int(main(cfg) or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        _leave_process_group()
        return 2


def _leave_process_group() -> None:
    """A rank that refuses leaves its process group in order: exiting with a live gloo/NCCL group can
    abort (SIGABRT) in the backend's destructor, which reads like a crash next to the one-line error."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
