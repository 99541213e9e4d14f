"""Which schema a file under configs/ is written for: configs/<stage>/*.yaml."""

from __future__ import annotations

from pathlib import Path

from pipeline.schema.encode import EncodeConfig
from pipeline.schema.evaluate import EvalConfig
from pipeline.schema.feedback import FeedbackConfig
from pipeline.schema.label import LabelConfig
from pipeline.schema.online import OnlineConfig
from pipeline.schema.sample import SampleConfig
from pipeline.schema.train import TrainConfig

SCHEMAS: dict[str, type] = {
    "encode": EncodeConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "sample": SampleConfig,
    "feedback": FeedbackConfig,
    "label": LabelConfig,
    "online": OnlineConfig,
}


def schema_for(path: str | Path) -> type:
    stage = Path(path).parent.name
    if stage not in SCHEMAS:
        raise KeyError(f"{path}: no schema for configs/{stage}/")
    return SCHEMAS[stage]
