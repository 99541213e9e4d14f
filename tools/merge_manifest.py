"""Merge the shard records of a finished encode or sample array into ``manifest.json``.

    python -m tools.merge_manifest DIR [--verify]

The encode and sample stages do this by themselves in whichever job finishes last; run this when that
job was killed after the last shard, or to re-verify every shard's sha256 (``--verify``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.d3po import trajectories
from pipeline.data import shards
from pipeline.data.manifest import merge_manifest

# by the plan's format: the encode stage's shards, the sample stage's trajectories (then its label index)
MERGE = {shards.FORMAT: merge_manifest, trajectories.FORMAT: trajectories.merge_trajectories}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.merge_manifest", description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--verify", action="store_true", help="re-hash every shard against its record")
    a = p.parse_args(argv)
    plan = Path(a.dir) / "plan.json"
    if not plan.is_file():
        print(f"{a.dir}: no plan.json: not an encode or sample output directory", file=sys.stderr)
        return 2
    fmt = json.loads(plan.read_text()).get("format")
    if fmt not in MERGE:
        print(f"{a.dir}: plan.json of format {fmt!r}, not {' or '.join(MERGE)}", file=sys.stderr)
        return 2
    m = MERGE[fmt](Path(a.dir), verify=a.verify)
    if m is None:
        print(f"{a.dir}: some shards are missing or fail verification; rerun the jobs", file=sys.stderr)
        return 1
    print(f"{a.dir}/manifest.json: {len(m['shards'])} shards, {m['counts']['pairs']} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
