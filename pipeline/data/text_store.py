"""Each distinct caption's text embedding, stored once (shard format v2).

Pick-a-Pic has about 15 pairs per caption, and a 77 x 768 float16 embedding (115.5 KiB, SDXL's
77 x 2048: 308 KiB) stored with every pair was most of every shard. The encode plan gives each
distinct caption to the shard where it first occurs in the kept rows' order (a pure function of the
input, so any job layout writes the same files): shard *i* comes with ``text-NNNNNN.npy``, float16
``[n_i, 77, D]``, the captions first seen in it in order of first occurrence (SDXL also
``pooled-NNNNNN.npy``, ``[n_i, P]``). A pair's json holds ``"text": [i, row]``. The job that writes
shard *i* encodes only those captions, so each embedding is computed once too. The loader
memory-maps the files read-only, lazily in each process (data workers included).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io import atomic_write_bytes, npy_bytes


def text_name(index: int) -> str:
    return f"text-{index:06d}.npy"


def pooled_name(index: int) -> str:
    return f"pooled-{index:06d}.npy"


@dataclass
class TextPlan:
    refs: list[tuple[int, int]]  # per kept row: (shard whose text file holds its caption, row there)
    first_seen: list[list[int]]  # per shard: kept indices of the captions first seen in it, in order


def plan_texts(caption_keys: list[bytes], ranges: list[tuple[int, int]]) -> TextPlan:
    where: dict[bytes, tuple[int, int]] = {}
    refs, first_seen = [], [[] for _ in ranges]
    for i, (a, b) in enumerate(ranges):
        for k in range(a, b):
            ref = where.get(caption_keys[k])
            if ref is None:
                ref = where[caption_keys[k]] = (i, len(first_seen[i]))
                first_seen[i].append(k)
            refs.append(ref)
    return TextPlan(refs=refs, first_seen=first_seen)


def write_texts(out_dir: Path, index: int, txt: np.ndarray, pooled: np.ndarray | None) -> list[dict]:
    """Write shard ``index``'s text files (tmp + rename); their records for the shard's sidecar."""
    records = []
    for name, arr in ((text_name(index), txt), (pooled_name(index), pooled)):
        if arr is None:
            continue
        data = npy_bytes(arr.astype(np.float16))
        atomic_write_bytes(Path(out_dir) / name, data)
        records.append(
            {"name": name, "count": len(arr), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    return records


class TextStore:
    """Looks up ``(txt, pooled)`` of a pair's ``text`` reference in a shard folder's text files.

    A missing, truncated or malformed file raises ``ValueError`` naming it (the loader substitutes
    and counts the pair, as for a damaged shard); the failure is remembered, not retried per pair."""

    def __init__(self, shard_dir: str | Path, manifest: dict):
        self.dir = Path(shard_dir)
        self.text_shape = tuple(manifest["text_shape"])
        self.pooled_dim = manifest.get("pooled_dim")
        self._maps: dict[str, np.ndarray] = {}
        self._bad: dict[str, str] = {}

    def __getstate__(self):  # memory maps are opened again in each data worker
        return {**self.__dict__, "_maps": {}, "_bad": {}}

    def _open(self, name: str, row_shape: tuple) -> np.ndarray:
        m = self._maps.get(name)
        if m is not None:
            return m
        if name not in self._bad:
            try:
                m = np.load(self.dir / name, mmap_mode="r", allow_pickle=False)
                if m.dtype != np.float16 or tuple(m.shape[1:]) != row_shape:
                    raise ValueError(
                        f"holds {m.dtype} {list(m.shape)}, expected float16 [n, {list(row_shape)}]"
                    )
                self._maps[name] = m
                return m
            except (OSError, ValueError) as e:
                self._bad[name] = str(e)
        raise ValueError(f"text store {self.dir / name} is unreadable: {self._bad[name]}")

    def lookup(self, ref) -> tuple[np.ndarray, np.ndarray | None]:
        i, r = int(ref[0]), int(ref[1])
        t = self._open(text_name(i), self.text_shape)
        if not 0 <= r < len(t):
            raise ValueError(f"text reference {[i, r]} is outside {self.dir / text_name(i)} ({len(t)} rows)")
        txt = np.array(t[r])  # a copy: nothing of the map outlives the lookup
        pooled = None
        if self.pooled_dim is not None:
            pooled = np.array(self._open(pooled_name(i), (self.pooled_dim,))[r])
        return txt, pooled
