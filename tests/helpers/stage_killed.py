"""Run a shard-writing stage (``python -m tests.helpers.stage_killed encode|sample ARGS``), but die by
SIGKILL halfway through writing the N-th shard tar (KILL_AT_TAR=N): a real crash in the worst window,
a partial temporary file on disk and no rename."""

import importlib
import os
import signal
import socket
import sys

import pipeline.data.shards as shards

_real = shards.atomic_write_bytes
_count = 0


def _dying_write(path, data):
    global _count
    if path.suffix == ".tar":
        _count += 1
        if _count == int(os.environ["KILL_AT_TAR"]):
            tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
            tmp.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    _real(path, data)


shards.atomic_write_bytes = _dying_write  # the name write_shard calls

stage = importlib.import_module(f"stages.{sys.argv[1]}")
sys.exit(stage.cli_main(sys.argv[2:]))
