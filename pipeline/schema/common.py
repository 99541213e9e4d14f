"""Value kinds shared by the schemas: a type with its valid range, checked by pipeline.config at load
time (before any model or file is opened) and shown in the README's config reference."""

from __future__ import annotations

from typing import Annotated, Literal

from annotated_types import Ge, Gt, Interval, Len, MinLen, MultipleOf

Count = Annotated[int, Ge(1)]  # a count or a size: steps, pairs, threads, every N steps
NonNegInt = Annotated[int, Ge(0)]  # 0 means off or none; seeds
Positive = Annotated[float, Gt(0)]  # a rate, a scale, a temperature
NonNegFloat = Annotated[float, Ge(0)]  # 0: off
Probability = Annotated[float, Interval(ge=0, le=1)]
Decay = Annotated[float, Interval(ge=0, lt=1)]  # EMA / Adam decay: 1 would never move
Quantile = Annotated[float, Interval(gt=0, lt=1)]
Text = Annotated[str, MinLen(1)]  # a path or a name: an empty path would mean the current directory
Names = Annotated[list[Text], MinLen(1)]  # a list that needs an item
Resolution = Annotated[int, Ge(8), MultipleOf(8)]  # pixels: the VAE downsamples by 8
Pair = Len(2, 2)  # a list of exactly two items

# One spelling of the floating-point formats everywhere (DeepSpeed's); torch dtypes: pipeline.models.DTYPES
Dtype = Literal["fp32", "fp16", "bf16"]
Device = Literal["auto", "cpu", "cuda"]  # auto: cuda (this rank's GPU) when present, else cpu
