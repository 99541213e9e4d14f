"""Per-annotator loss weights for heavy-tailed labels per annotator (pipeline/data/annotator_weights.py).

    python -m tools.annotator_weights --data PARQUET [--cap N] --out annotator_weights.json
    python -m stages.train --config ... data.annotator_weights=annotator_weights.json

Each annotator's labels together weigh at most ``--cap`` labels (default: the median annotator's
count), scaled so that the mean weight over the pairs is 1.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.data.annotator_weights import label_counts, write_weights
from pipeline.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.annotator_weights", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data", required=True, help="the training parquet: a file, a directory or a glob")
    p.add_argument(
        "--cap", type=float, default=None, help="labels per annotator at full weight (default: median)"
    )
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        doc = write_weights(label_counts(a.data), a.cap, a.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(doc["annotators"])
    print(
        f"{a.out}: {n} annotators, {doc['pairs']} pairs, cap {doc['cap']:g} labels, "
        f"effective pairs {doc['effective_pairs']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
