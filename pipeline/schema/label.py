"""Config of ``stages.label serve`` (the labelling web app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LabelItems:
    mode: Literal["auto", "pairs", "best_of_k"] = (
        "auto"  # auto: parquet -> pairs, sampling folder -> best_of_k
    )
    max_items: int = 0  # 0: every usable item of the source; N: the first N (after shuffling)
    shuffle: bool = True  # serve items in a seeded random order instead of the source's
    seed: int = 0  # item order and which items become checks

    def check(self) -> list[str]:
        return [] if self.max_items >= 0 else [f"max_items: must be >= 0, got {self.max_items}"]


@dataclass
class LabelAssignment:
    per_item: int = 3  # R: distinct annotators who label each item (skips do not count)
    lease_s: float = 600.0  # an item handed out and not answered within this goes back to the pool
    preload: int = 1  # items handed out beyond the one on screen, so the next one is already loaded

    def check(self) -> list[str]:
        errors = []
        if self.per_item < 1:
            errors.append(f"per_item: must be >= 1, got {self.per_item}")
        if self.lease_s <= 0:
            errors.append(f"lease_s: must be > 0, got {self.lease_s}")
        if not 0 <= self.preload <= 4:
            errors.append(f"preload: must be in [0, 4], got {self.preload}")
        return errors


@dataclass
class LabelChecks:
    count: int = 0  # items with a known answer, shown to every annotator to measure reliability
    column: str = "label_0"  # parquet column holding the answer: 1 = image 0 is better, 0 = image 1
    every: int = 10  # one check item among every N items an annotator gets

    def check(self) -> list[str]:
        errors = [] if self.count >= 0 else [f"count: must be >= 0, got {self.count}"]
        return errors + ([] if self.every >= 2 else [f"every: must be >= 2, got {self.every}"])


@dataclass
class LabelServer:
    host: str = "127.0.0.1"  # loopback only; a remote team reaches it through a TLS reverse proxy
    port: int = 8000
    workers: int = 1  # app processes (uvicorn workers); they share the database
    max_body_bytes: int = 16384  # larger request bodies get 413
    forwarded_allow_ips: str | None = None  # proxy address(es) whose X-Forwarded-* headers are trusted
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def check(self) -> list[str]:
        errors = []
        if not 0 <= self.port <= 65535:
            errors.append(f"port: must be in [0, 65535], got {self.port}")
        if self.workers < 1:
            errors.append(f"workers: must be >= 1, got {self.workers}")
        if self.max_body_bytes < 1024:
            errors.append(f"max_body_bytes: must be >= 1024, got {self.max_body_bytes}")
        return errors


@dataclass
class LabelConfig:
    db: str  # SQLite file (created, WAL mode) or a postgresql://user@host:port/dbname URL
    source: str  # Pick-a-Pic parquet (file, directory or glob) or a sampling folder with images.jsonl
    items: LabelItems = field(default_factory=LabelItems)
    assignment: LabelAssignment = field(default_factory=LabelAssignment)
    checks: LabelChecks = field(default_factory=LabelChecks)
    server: LabelServer = field(default_factory=LabelServer)
