"""Prompt files: a text file, a prompt a line, or Pick-a-Pic parquet (its distinct captions).

One rule for every stage that reads prompts (the sample stage's, as its config documents it): every
line of a text file is a prompt, stripped, blank lines included as empty prompts, so prompt i is line
i (its seed and key depend on i). A stage skips the empty ones: the sample stage counts them
(``empty_prompt``, ``pipeline.d3po.sampler.screen_prompts``), the evaluation leaves them out
(``pipeline.evaluate.generate.read_prompts``).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import UserError


@dataclass
class PromptList:
    prompts: list[str]  # index i is prompt i (its noise, its key); empty strings included
    files: list[Path]
    rows_read: int  # lines of the text file, or parquet rows
    kind: str  # "text" | "parquet"


def _parquet_files(source: str) -> list[Path]:
    p = Path(source)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(p.rglob("*.parquet"))
    return sorted(Path(f) for f in glob.glob(source, recursive=True) if f.endswith(".parquet"))


def read_prompt_source(
    source: str, max_prompts: int | None = None, key: str = "prompts.source"
) -> PromptList:
    """A text file (one prompt a line, stripped; every line counts, duplicates included) or Pick-a-Pic
    parquet file(s) (the distinct ``caption`` values in first-occurrence order: Pick-a-Pic repeats a
    caption in ~14 pairs; a null caption reads as the empty prompt). ``max_prompts`` keeps the first N."""
    p = Path(source)
    if p.is_file() and p.suffix != ".parquet":
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"{key}={source}: not a UTF-8 text file ({e})") from e
        prompts = [line.strip() for line in lines]
        out = PromptList(prompts, [p], len(lines), "text")
    else:
        files = _parquet_files(source)
        if not files:
            what = "no such file" if not (p.exists() or glob.has_magic(source)) else "no parquet files found"
            raise UserError(
                f"{key}={source}: {what} (give a text file with a prompt a line, or Pick-a-Pic "
                "parquet: a .parquet file, a directory or a glob)"
            )
        seen: dict[str, None] = {}
        rows = 0
        for f in files:
            try:
                names = pq.read_schema(f).names
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise UserError(f"{f}: not a readable parquet file ({e})") from e
            if "caption" not in names:
                raise UserError(f"{f}: no caption column ({key} takes Pick-a-Pic parquet)")
            col = pq.read_table(f, columns=["caption"])["caption"].to_pylist()
            rows += len(col)
            for c in col:
                seen.setdefault("" if c is None else str(c))
        out = PromptList(list(seen), files, rows, "parquet")
    if max_prompts is not None:
        out.prompts = out.prompts[:max_prompts]
    if not out.prompts:
        raise UserError(f"{key}={source}: no prompts in it")
    return out
