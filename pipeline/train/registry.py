"""The workloads the trainer picks from, by the objective's ``data_kind`` (``pipeline.train.workload``)."""

from __future__ import annotations

from pipeline.losses.objectives import Objective
from pipeline.schema.train import TrainConfig
from pipeline.train.pairs import PairWorkload
from pipeline.train.trajectories import TrajectoryWorkload
from pipeline.train.workload import Workload

WORKLOADS: dict[str, type[Workload]] = {"pairs": PairWorkload, "trajectories": TrajectoryWorkload}


def build_workload(cfg: TrainConfig, objective: Objective) -> Workload:
    """The objective's workload; its constructor checks the data before any model loads."""
    return WORKLOADS[objective.data_kind](cfg, objective)
