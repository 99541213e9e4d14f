"""Stage feedback: D3PO trajectories -> per-pair preferences, from scripted rewards or people's labels.

    python -m stages.feedback --config configs/feedback/tiny.yaml trajectories=/runs/d3po/traj \
        out=/runs/d3po/prefs rewards=[jpeg_compressibility]
    python -m stages.feedback --config configs/feedback/tiny.yaml trajectories=/runs/d3po/traj \
        out=/runs/d3po/prefs source=human human=/labels/export/image_preferences.jsonl

Reads every prompt group of the trajectory folder in manifest order and writes, for every pair of
its K images, which one is preferred (``pipeline.d3po.feedback_files`` describes the file). Rewards
only compare (several by Pareto dominance); a group with an image that does not decode is skipped
and counted, never a traceback. People's labels (the labelling export's ``image_preferences.jsonl``)
need no image decoding: they are matched to the folder's images by image key. One process, no GPU
unless a scorer reward asks for one; rerunning with the same inputs writes the same bytes, and a
killed run leaves the previous files (each is replaced by an atomic rename).
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.d3po.feedback import decide_preferences
from pipeline.schema.feedback import FeedbackConfig


def main(cfg: FeedbackConfig) -> int:
    decide_preferences(cfg)
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run("python -m stages.feedback", FeedbackConfig, main, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli_main())
