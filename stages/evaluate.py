"""Stage evaluate: preference accuracy, generation, reward scores and the minority report.

    python -m stages.evaluate --config configs/eval/default.yaml output=/reports/a1 \
        models.unets.dpo=/runs/dpo models.unets.adaptive=/runs/adaptive \
        preference.shards=/shards/sd15_heldout generation.prompts=prompts/pickapic_test.txt \
        scorers.pickscore=/weights/PickScore_v1

Writes report.json, report.md (the paper's Table 3 layout: mean ± standard error per metric per
model), PNG plots, image grids, and per run with flipped labels the minority-detection report.
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.evaluate.run import run_evaluation
from pipeline.schema.evaluate import EvalConfig


def main(cfg: EvalConfig) -> int:
    return run_evaluation(cfg)


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run("stages.evaluate", EvalConfig, main, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli_main())
