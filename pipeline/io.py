"""Files: written so that a reader, or the same command run again, never sees a torn one; JSON lines
read with errors that name the line.

Every file the stages write goes through ``write_temporary``: the bytes are fsynced under a temporary
name beside the target (``.<name>.tmp-<host>-<pid>``, so jobs of an array on other hosts never share
one), then renamed (``atomic_write_bytes``) or hard-linked into place. A full disk or quota is one line
naming the file system, not a traceback; the temporary is removed and finished files are kept, so the
same command resumes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import UserError


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.is_mount():
        path = path.parent
    return path


def write_temporary(path: Path, data: bytes) -> Path:
    """``data`` fsynced under a temporary name beside ``path``; the caller renames or links it into
    place. A full disk or quota is a one-line UserError naming the file system (the temporary removed)."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"writing {path}: {os.strerror(e.errno).lower()} on the file system at {_mount_point(path.parent)}; "
                "free space and run the same command again (finished shards are kept)"
            ) from e
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one rename (``write_temporary``, then ``os.replace``)."""
    write_temporary(Path(path), data).replace(path)


def write_json_atomic(path: Path, obj: dict, indent: int = 1) -> None:
    """``obj`` as JSON (sorted keys, a final newline), written by ``atomic_write_bytes``."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode())


def npy_bytes(arr: np.ndarray) -> bytes:
    """The ``.npy`` bytes of ``arr`` (C order, never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file (UTF-8); a line that is not
    a JSON object is a UserError naming it (``path:line``)."""
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{no}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{no}: expected a JSON object")
            yield no, rec
