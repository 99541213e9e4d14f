"""Stage encode: Pick-a-Pic pairs -> webdataset shards of VAE latents and text embeddings + a manifest.

    python -m stages.encode --config configs/encode/sd15.yaml model.path=/models/sd15 \
        data.source=/data/pickapic/train output.dir=/shards/sd15

Run it as many independent jobs as you like (torchrun / deepspeed / SLURM set RANK and WORLD_SIZE,
or give dist.rank=R dist.world_size=W): shard i belongs to job i % W, and which rows go to shard i
does not depend on W. A restarted job skips the shards it finished and redoes the others.
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.data.encoding import encode_pairs
from pipeline.schema.encode import EncodeConfig


def main(cfg: EncodeConfig) -> int:
    print(encode_pairs(cfg))
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    return cli.run("python -m stages.encode", EncodeConfig, main, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli_main())
