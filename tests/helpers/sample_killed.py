"""Run stages.sample, but die by SIGKILL halfway through writing the N-th shard tar (KILL_AT_TAR=N):
a real crash in the worst window, a partial temporary file on disk and no rename."""

import os
import signal
import socket
import sys

import pipeline.data.shards as shards

_real = shards._atomic_write_bytes
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


shards._atomic_write_bytes = _dying_write

from stages.sample import cli_main  # noqa: E402

sys.exit(cli_main(sys.argv[1:]))
