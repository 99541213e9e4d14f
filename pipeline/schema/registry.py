"""Which schema a file under configs/ is written for: configs/<stage>/*.yaml."""

from __future__ import annotations

from pathlib import Path


def schema_for(path: str | Path) -> type:
    stage = Path(path).parent.name
    if stage == "encode":
        from pipeline.schema.encode import EncodeConfig

        return EncodeConfig
    if stage == "train":
        from pipeline.schema.train import TrainConfig

        return TrainConfig
    if stage == "eval":
        from pipeline.schema.evaluate import EvalConfig

        return EvalConfig
    if stage == "sample":
        from pipeline.schema.sample import SampleConfig

        return SampleConfig
    if stage == "feedback":
        from pipeline.schema.feedback import FeedbackConfig

        return FeedbackConfig
    if stage == "label":
        from pipeline.schema.label import LabelConfig

        return LabelConfig
    if stage == "online":
        from pipeline.schema.online import OnlineConfig

        return OnlineConfig
    raise KeyError(f"{path}: no schema for configs/{stage}/")
