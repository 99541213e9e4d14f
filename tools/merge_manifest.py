"""Merge the shard records of a finished encode array into ``manifest.json``.

    python -m tools.merge_manifest DIR [--verify]

The encode stage does this by itself in whichever job finishes last; run this when that job was
killed after the last shard, or to re-verify every shard's sha256 (``--verify``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.data.manifest import merge_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.merge_manifest", description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--verify", action="store_true", help="re-hash every shard against its record")
    a = p.parse_args(argv)
    if not (Path(a.dir) / "plan.json").is_file():
        print(f"{a.dir}: no plan.json: not an encode output directory", file=sys.stderr)
        return 2
    m = merge_manifest(Path(a.dir), verify=a.verify)
    if m is None:
        print(
            f"{a.dir}: some shards are missing or fail verification; rerun the encode jobs", file=sys.stderr
        )
        return 1
    print(f"{a.dir}/manifest.json: {len(m['shards'])} shards, {m['counts']['pairs']} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
