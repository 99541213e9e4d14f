"""The plan of a shard-writing job array and the manifest merged from its shard records.

The plan is a pure function of the inputs, the model and the config; every job of an array (the
encode stage's, the sample stage's) computes the same plan and writes the same ``plan.json``. A job
that finds a ``plan.json`` that differs (another model, resolution or input in the same output dir)
refuses. When every shard's sidecar record exists, the plan and the records merge into
``manifest.json``: ``merge_manifest`` collects the records and the format's ``contents`` function
checks that they add up and says what else the manifest holds (``pair_contents``: the encoded pairs';
``pipeline.d3po.trajectories.trajectory_contents``: the sampled trajectories').
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pipeline.config import flatten
from pipeline.data.shards import finished_record, shard_name
from pipeline.errors import UserError
from pipeline.io import write_json_atomic

# (folder, plan, the shard records in order) -> the format's own manifest keys; UserError when the
# records do not add up
Contents = Callable[[Path, dict, list[dict]], dict]


def shard_ranges(n_kept: int, shard_size: int) -> list[tuple[int, int]]:
    """Kept-row index ranges [start, end) of each shard."""
    return [(s, min(s + shard_size, n_kept)) for s in range(0, n_kept, shard_size)]


def check_or_write_plan(out_dir: Path, plan: dict, what: str = "shards of another encode run") -> None:
    """Write ``plan.json``, or refuse if the folder holds ``what`` (another model, input or setting):
    its shards would mix with this run's."""
    path = out_dir / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            a, b = flatten(old), flatten(plan)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise UserError(
                f"{out_dir} holds {what} (differs in: {', '.join(diff[:8])}); "
                "use a new output.dir or delete the old shards"
            )
        return
    write_json_atomic(path, plan)


def merge_manifest(out_dir: Path, verify: bool = False, contents: Contents | None = None) -> dict | None:
    """Write ``manifest.json`` from ``plan.json`` and the shard sidecars; None while shards are missing.
    ``contents``: the format's keys (default ``pair_contents``, the encode stage's format)."""
    out_dir = Path(out_dir)
    plan = json.loads((out_dir / "plan.json").read_text())
    records = []
    for i in range(plan["n_shards"]):
        rec = finished_record(out_dir / shard_name(i), verify=verify)
        if rec is None:
            return None
        records.append(rec)
    manifest = {
        **{k: v for k, v in plan.items() if k != "scan"},
        **(contents or pair_contents)(out_dir, plan, records),
        "shards": [{k: r[k] for k in ("name", "count", "bytes", "sha256")} for r in records],
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def pair_contents(out_dir: Path, plan: dict, records: list[dict]) -> dict:
    """The encoded pairs' manifest keys: counts (rows read, pairs, skipped rows by reason, captions),
    the skipped ranking ids, the text files and the sizes."""
    skipped = Counter(plan["scan"]["skipped"])
    skipped_ids = {k: list(v) for k, v in plan["scan"]["skipped_ids"].items()}
    for rec in records:
        skipped.update(rec["skipped"])
        for reason, ids in rec["skipped_ids"].items():
            skipped_ids.setdefault(reason, []).extend(ids)
    for rec in records:
        start, end = rec["rows"]
        if rec["count"] + sum(rec["skipped"].values()) != end - start:
            raise UserError(
                f"{out_dir / rec['name']}: its record says {rec['count']} pairs + "
                f"{sum(rec['skipped'].values())} skipped rows, but the shard covers {end - start} rows; delete "
                "the shard and its .json and run the encode again"
            )
    kept = sum(r["count"] for r in records)
    if kept + sum(skipped.values()) != plan["scan"]["rows_read"]:
        raise UserError(
            f"{out_dir}: the shard records do not add up: {kept} pairs + {sum(skipped.values())} skipped rows "
            f"!= {plan['scan']['rows_read']} rows read; a shard record was edited or written by another "
            "version: delete the shards whose counts are wrong and run the encode again"
        )
    text_files = [t for r in records for t in r.get("text_files", [])]
    text_bytes = sum(t["bytes"] for t in text_files)
    return {
        "counts": {
            "rows_read": plan["scan"]["rows_read"],
            "pairs": kept,
            "skipped": dict(sorted(skipped.items())),
            "captions": sum(t["count"] for t in text_files if t["name"].startswith("text-")),
        },
        "skipped_ranking_ids": {k: sorted(v) for k, v in sorted(skipped_ids.items())},
        "text_files": text_files,
        "text_bytes": text_bytes,
        "total_bytes": sum(r["bytes"] for r in records) + text_bytes,
    }
