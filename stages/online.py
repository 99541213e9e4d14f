"""Stage online (D3PO, part 4): rounds of sample -> feedback -> train -> evaluate, one training run.

    python -m stages.online --config configs/online/tiny.yaml model.path=/models/tiny out=/runs/online

Round r (``<out>/round_NNN/``): sample the training prompts with the current policy (round 0: the base
UNet; later: this run's export, ``<out>/run``), decide their preferences, continue the one training
run ``<out>/run`` up to (r + 1) x ``steps_per_round`` optimizer steps on them (``stages.train``), then
sample the fixed evaluation prompts with the new policy and score them (``report.json``, a grid).
Each phase runs in a child process and ends with an atomic ``<phase>.done`` marker: a rerun of the
same command skips the finished phases, so a killed loop ends as an uninterrupted one would
(``pipeline.d3po.loop`` has the details). The sample, feedback and eval children are this command in
its phase mode, ``python -m stages.online --phase <out>/config.yaml PHASE ROUND``.
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.d3po.loop import PHASE_MODE, Loop, PhaseFailed
from pipeline.schema.online import OnlineConfig


def main(cfg: OnlineConfig) -> int:
    try:
        return Loop(cfg).run()
    except PhaseFailed as e:
        print(f"python -m stages.online: error: {e}", file=sys.stderr, flush=True)
        return e.rc


def phase_main(config: str, phase: str, r: str) -> int:
    """The child of ``Loop.in_child``: one phase of the loop saved in ``config`` (``<out>/config.yaml``)."""
    return cli.run(
        "python -m stages.online",
        OnlineConfig,
        lambda cfg: Loop(cfg).run_phase(phase, int(r)),
        ["--config", config],
        "one phase of the online loop",
    )


def cli_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [PHASE_MODE] and len(argv) == 4:
        return phase_main(*argv[1:])
    return cli.run("python -m stages.online", OnlineConfig, main, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(cli_main())
