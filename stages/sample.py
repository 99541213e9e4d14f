"""Stage sample (D3PO, part 1): prompts + a model -> trajectory shards of K images per prompt + a manifest.

    python -m stages.sample --config configs/sample/sd15.yaml model.path=/models/sd15 \
        prompts.source=/data/prompts.txt output.dir=/trajectories/sd15-r0 [model.unet=/runs/d3po-r0]

Each prompt's K images start from the same initial noise and are sampled with DDIM at eta > 0 and
classifier-free guidance, keeping every latent and every transition's log-prob
(``pipeline.d3po.trajectories`` describes the format). Job arrays and restarts work as in the encode
stage: shard i belongs to job i % W, its prompts are a pure function of the prompt list and
``output.shard_size``, and every random draw of prompt i comes from a generator seeded by
(sampler.seed, i), so any job layout writes byte-identical shards; a restarted job skips the shards it
finished.
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.d3po.sampling import sample_trajectories
from pipeline.schema.sample import SampleConfig


def main(cfg: SampleConfig) -> int:
    print(sample_trajectories(cfg))
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run("python -m stages.sample", SampleConfig, main, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli_main())
