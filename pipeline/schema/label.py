"""Config of ``stages.label serve`` (the labelling web app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Interval

from pipeline.schema.common import Count, NonNegInt, Positive, Text

Port = Annotated[int, Interval(ge=0, le=65535)]  # 0: any free port
Preload = Annotated[int, Interval(ge=0, le=4)]
ItemMode = Literal["auto", "pairs", "best_of_k"]


@dataclass
class LabelItems:
    mode: ItemMode = "auto"  # auto: parquet -> pairs, sampling folder -> best_of_k
    max_items: NonNegInt = 0  # 0: every usable item of the source; N: the first N (after shuffling)
    shuffle: bool = True  # serve items in a seeded random order instead of the source's
    seed: NonNegInt = 0  # item order and which items become checks


@dataclass
class LabelAssignment:
    per_item: Count = 3  # R: distinct annotators who label each item (skips do not count)
    lease_s: Positive = 600.0  # an item handed out and not answered within this goes back to the pool
    preload: Preload = 1  # items handed out beyond the one on screen, so the next one is already loaded


@dataclass
class LabelChecks:
    count: NonNegInt = 0  # items with a known answer, shown to every annotator to measure reliability
    column: Text = "label_0"  # parquet column holding the answer: 1 = image 0 is better, 0 = image 1
    every: Annotated[int, Interval(ge=2)] = 10  # one check item among every N items an annotator gets


@dataclass
class LabelServer:
    host: Text = "127.0.0.1"  # loopback only; a remote team reaches it through a TLS reverse proxy
    port: Port = 8000
    workers: Count = 1  # app processes (uvicorn workers); they share the database
    max_body_bytes: Annotated[int, Interval(ge=1024)] = 16384  # larger request bodies get 413
    forwarded_allow_ips: Text | None = None  # proxy address(es) whose X-Forwarded-* headers are trusted
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"


@dataclass
class LabelConfig:
    db: Text  # SQLite file (created, WAL mode) or a postgresql://user@host:port/dbname URL
    # null: serve the items the database already holds (the online loop adds each round's itself)
    source: Text | None = (
        None  # Pick-a-Pic parquet (file, directory or glob) or a sampling folder with images.jsonl
    )
    items: LabelItems = field(default_factory=LabelItems)
    assignment: LabelAssignment = field(default_factory=LabelAssignment)
    checks: LabelChecks = field(default_factory=LabelChecks)
    server: LabelServer = field(default_factory=LabelServer)
