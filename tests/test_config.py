"""The config loader: typed dataclasses, dotted overrides, every error at once, close-match hints."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    beta: float = 1000.0
    mode: Literal["a", "b"] = "a"
    c2: float | Literal["batch_mean"] = "batch_mean"

    def check(self) -> list[str]:
        return [] if self.beta > 0 else [f"beta: must be > 0, got {self.beta}"]


@dataclass
class Outer:
    path: str
    steps: int = 10
    flag: bool = False
    decays: list[float] = field(default_factory=lambda: [0.9999, 0.5])
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("path: /x\ninner:\n  beta: 2500\n")
    cfg = load_config(
        Outer, p, ["steps=3", "inner.mode=b", "inner.c2=0.5", "decays=[0.9, 0.5]", "inner.beta=1e-8"]
    )
    assert cfg == Outer(path="/x", steps=3, decays=[0.9, 0.5], inner=Inner(beta=1e-8, mode="b", c2=0.5))
    assert isinstance(cfg.inner.beta, float)


def test_unknown_keys_and_wrong_types_all_reported_with_hints(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(
            Outer, None, ["path=/x", "stpes=3", "inner.bta=2", "inner.mode=c", "flag=maybe", "steps=1.5"]
        )
    msg = str(e.value)
    assert len(e.value.errors) == 5, msg
    assert "stpes: unknown key (did you mean 'steps'?)" in msg
    assert "inner.bta: unknown key (did you mean 'beta'?)" in msg
    assert "inner.mode: expected one of 'a', 'b', got 'c'" in msg
    assert "flag: expected bool, got str 'maybe'" in msg
    assert "steps: expected int, got float 1.5" in msg


def test_missing_required_and_check_hook():
    with pytest.raises(ConfigError, match="path: missing required key"):
        load_config(Outer, None, [])
    with pytest.raises(ConfigError, match=r"inner.beta: must be > 0, got -1.0"):
        load_config(Outer, None, ["path=/x", "inner.beta=-1"])


def test_flag_style_override_rejected():
    with pytest.raises(ConfigError, match="--lr: unknown option"):
        load_config(Outer, None, ["path=/x", "--lr"])


def _required_overrides(cls, prefix="") -> list[str]:
    """key=dummy for every required string field, so a config file can be validated on its own."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _required_overrides(tp, key + ".")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            out.append(f"{key}=/required/placeholder")
    return out


def test_every_config_file_validates():
    from pipeline.schema import registry

    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files, "no config files found"
    for path in files:
        cls = registry.schema_for(path)
        load_config(cls, path, _required_overrides(cls))


def test_ema_half_lives_count_as_ema_models_for_the_adaptive_objectives():
    from pipeline.schema.train import TrainConfig

    base = ["data.shards=s", "output.dir=o", "objective.name=adaptive_dpo"]
    cfg = load_config(TrainConfig, None, [*base, "ema.half_lives=[50,5]"])
    assert len(cfg.ema.all_decays) == 2
    with pytest.raises(ConfigError, match="need at least one EMA model"):
        load_config(TrainConfig, None, base)


def test_every_error_at_once_across_sections():
    """Three range errors in three sections, a typo and a cross-field rule: all five reported."""
    from pipeline.schema.train import TrainConfig

    args = [
        "data.shards=s",
        "output.dir=o",
        "data.micro_batch=0",
        "model.lora_rank=-1",
        "optim.lr=-1",
        "train.max_stpes=5",
        "objective.name=adaptive_dpo",
    ]
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, args)
    keys = sorted(m.split(":")[0] for m in e.value.errors)
    assert keys == ["data.micro_batch", "ema.decays", "model.lora_rank", "optim.lr", "train.max_stpes"], (
        e.value
    )
    assert "train.max_stpes: unknown key (did you mean 'max_steps'?)" in e.value.errors
    assert "data.micro_batch: must be >= 1, got 0" in e.value.errors
    assert "model.lora_rank: must be >= 0, got -1" in e.value.errors
    assert "optim.lr: must be > 0, got -1" in e.value.errors


@pytest.mark.parametrize(
    ("stage", "override", "message"),
    [
        ("encode", "run.batch_size=0", "run.batch_size: must be >= 1, got 0"),
        ("encode", "run.batch_size=-1", "run.batch_size: must be >= 1, got -1"),
        ("train", "checkpoint.every=0", "checkpoint.every: must be >= 1, got 0"),
        ("train", "output.dir=", "output.dir: must be non-empty, got ''"),
        ("encode", "output.dir=", "output.dir: must be non-empty, got ''"),
        ("encode", "data.resolution=100", "data.resolution: must be >= 8 and a multiple of 8, got 100"),
    ],
)
def test_out_of_range_values_exit_2_through_the_cli_before_any_model_loads(
    stage, override, message, tmp_path, capsys
):
    """The model and data paths do not exist: the range error comes first, so nothing was opened."""
    from stages import encode, train

    missing = tmp_path / "missing"
    if stage == "encode":
        args = [
            "--config",
            str(ROOT / "configs/encode/tiny.yaml"),
            f"model.path={missing}",
            f"data.source={missing}",
            f"output.dir={tmp_path / 'out'}",
            override,
        ]
        rc = encode.cli_main(args)
    else:
        args = [
            "--config",
            str(ROOT / "configs/train/tiny_dpo.yaml"),
            f"model.path={missing}",
            f"data.shards={missing}",
            f"output.dir={tmp_path / 'out'}",
            override,
        ]
        rc = train.cli_main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "1 configuration error(s)" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_every_numeric_and_path_key_has_a_range():
    """A bare int, float or str field would accept 0, -1 or '' for a count, a rate or a path; the few
    keys whose whole range is valid are listed here."""
    from pipeline.schema.encode import EncodeConfig
    from pipeline.schema.evaluate import EvalConfig
    from pipeline.schema.train import TrainConfig

    unbounded = {"objective.adaptive.k2", "objective.adaptive.c2"}  # signed: -1/beta, mean h
    bare = []
    for cls in (EncodeConfig, TrainConfig, EvalConfig):
        for key, tp in _leaf_types(cls):
            if key not in unbounded and {"int", "float", "str"} & set(str(tp).replace("|", " ").split()):
                bare.append(f"{cls.__name__}: {key}: {tp}")
    assert not bare, "give these keys a range (pipeline/schema/common.py):\n" + "\n".join(bare)


def _leaf_types(cls, prefix=""):
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_types(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", _bare_name(tp)


def _bare_name(tp) -> str:
    """The type with its constrained parts replaced by 'ok': 'int | None' stays bare, Count | None does not."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return "ok"
    if origin is typing.Literal:
        return "literal"
    args = typing.get_args(tp)
    if origin is dict:  # names -> values: the values need the range
        return _bare_name(args[1])
    if args:
        return " | ".join(_bare_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def test_one_dtype_vocabulary_across_schemas_and_code():
    """Every dtype-like key takes fp32 / fp16 / bf16 (DeepSpeed's spelling), each mapped to a torch
    dtype; torch's spelling is refused with the matching name suggested."""
    import torch

    from pipeline.models import DTYPES
    from pipeline.schema.common import Dtype
    from pipeline.schema.encode import EncodeConfig
    from pipeline.schema.evaluate import EvalConfig
    from pipeline.schema.train import TrainConfig

    assert DTYPES == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert set(typing.get_args(Dtype)) == set(DTYPES)
    keys = {}
    for cls in (EncodeConfig, TrainConfig, EvalConfig):
        for key, _ in _leaf_types(cls):
            if key.split(".")[-1] in ("dtype", "precision") or key.endswith("_dtype"):
                keys[f"{cls.__name__}.{key}"] = _choices(cls, key)
    assert len(keys) == 6, keys  # vae, text, latent (encode); reference, precision (train); evaluate
    for key, choices in keys.items():
        assert choices and choices <= {"auto", *DTYPES}, (key, choices)
    base = ["data.shards=s", "output.dir=o"]
    for override, want in [
        ("model.reference_dtype=float16", "fp16"),
        ("train.precision=bfloat16", "bf16"),
        ("train.precision=float32", "fp32"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(TrainConfig, None, [*base, override])
        assert e.value.errors[0].endswith(f"(did you mean '{want}'?)"), e.value.errors


def _choices(cls, dotted: str) -> set:
    *sections, name = dotted.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls)[s]
    return set(typing.get_args(typing.get_type_hints(cls)[name]))


def _write(d: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)


def test_base_chain_merges_mappings_replaces_lists_and_overrides_win(tmp_path):
    """c <- b <- a (b in another folder, named relative to a): a mapping key set in any file survives,
    a list is replaced whole, the nearer file wins, and command-line overrides win over every file."""
    _write(
        tmp_path,
        {
            "c.yaml": "path: /c\nsteps: 1\ndecays: [0.1, 0.2, 0.3]\ninner: {beta: 1.0, mode: b}\n",
            "sub/b.yaml": "base: ../c.yaml\nsteps: 2\ninner: {beta: 2.0}\n",
            "a.yaml": "base: sub/b.yaml\ndecays: [0.9]\ninner: {c2: 0.5}\n",
        },
    )
    cfg = load_config(Outer, tmp_path / "a.yaml", ["steps=7"])
    assert cfg == Outer(path="/c", steps=7, decays=[0.9], inner=Inner(beta=2.0, mode="b", c2=0.5))
    from pipeline.config import dump_yaml

    assert "base" not in dump_yaml(cfg)  # the resolved config is fully expanded


def test_a_list_of_bases_merges_in_order(tmp_path):
    _write(
        tmp_path,
        {
            "x.yaml": "path: /x\nsteps: 1\n",
            "y.yaml": "steps: 2\nflag: true\n",
            "a.yaml": "base: [x.yaml, y.yaml]\n",
        },
    )
    assert load_config(Outer, tmp_path / "a.yaml") == Outer(path="/x", steps=2, flag=True)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"},
            r"a\.yaml: base cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml",
        ),
        ({"a.yaml": "base: a.yaml\n"}, r"a\.yaml: base cycle"),
        ({"a.yaml": "base: sub/nope.yaml\n"}, r"a\.yaml: base sub/nope\.yaml: no such file"),
        (
            {"a.yaml": "base: b.yaml\n", "b.yaml": "base: [gone.yaml]\n"},
            r"b\.yaml: base gone\.yaml: no such file",
        ),
        ({"a.yaml": "base: {x: 1}\n"}, r"a\.yaml: base: expected a file name or a list of them"),
    ],
)
def test_base_cycles_and_missing_bases_name_the_file(tmp_path, files, message):
    _write(tmp_path, files)
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, tmp_path / "a.yaml", ["path=/x"])


def test_paper_configs_resolve_through_their_bases():
    """sd15_adaptive_dpo_lora <- sd15_adaptive_dpo <- [sd15_dpo <- paper_base, adaptive_dpo_paper]."""
    from pipeline.schema.train import TrainConfig

    cfg = load_config(
        TrainConfig, ROOT / "configs/train/sd15_adaptive_dpo_lora.yaml", _required_overrides(TrainConfig)
    )
    assert (cfg.model.lora_rank, cfg.data.micro_batch, cfg.train.grad_accum) == (8, 4, 4)  # the file itself
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.ema.offload) == (1e-5, 100, False)
    assert (cfg.objective.name, cfg.objective.beta, cfg.objective.adaptive.k1) == (
        "adaptive_dpo",
        1000.0,
        10.0,
    )
    assert cfg.ema.decays == [0.9999, 0.5] and cfg.train.precision == "fp16"  # adaptive_dpo_paper, sd15_dpo
    assert (cfg.train.max_steps, cfg.checkpoint.every, cfg.model.gradient_checkpointing) == (12000, 500, True)
    xl = load_config(
        TrainConfig, ROOT / "configs/train/sdxl_adaptive_dpo.yaml", _required_overrides(TrainConfig)
    )
    assert (xl.objective.beta, xl.objective.adaptive.k1, xl.objective.adaptive.rho) == (2500.0, 1.0, 15.0)
    assert (xl.train.precision, xl.train.grad_accum, xl.objective.adaptive.warmup_steps) == ("bf16", 16, 100)


def test_adaptive_reading_presets_resolve_to_their_reading():
    """adaptive_paper.yaml (the paper read literally) and adaptive_authors_code.yaml (the authors' code),
    layered on tiny_adaptive_dpo.yaml: each sets the formula keys of its reading and nothing else, so the
    two tiny variants differ from tiny_adaptive_dpo in objective.adaptive keys only; the authors' code's
    reading equals the defaults but for the spread."""
    from pipeline.config import flatten, to_dict
    from pipeline.schema.train import TrainConfig

    def load(name):
        path = ROOT / "configs/train" / f"{name}.yaml"
        return load_config(TrainConfig, path, _required_overrides(TrainConfig))

    paper = load("tiny_adaptive_dpo_paper_literal").objective.adaptive
    assert (paper.spread, paper.spread_of, paper.c2, paper.ipo_margin) == (
        "variance",
        "h",
        "batch_mean_logit",
        "h",
    )
    code = load("tiny_adaptive_dpo_authors_code").objective.adaptive
    assert (code.spread, code.spread_of, code.c2, code.ipo_margin) == (
        "std_clamped",
        "g",
        "batch_mean",
        "logit",
    )
    for a in (paper, code):
        assert (a.g_scale, a.score, a.normalize, a.k2, a.rho, a.k1) == ("raw", "cs", False, None, 15.0, 10.0)
    base = flatten(to_dict(load("tiny_adaptive_dpo")))
    for name in ("tiny_adaptive_dpo_paper_literal", "tiny_adaptive_dpo_authors_code"):
        cfg = flatten(to_dict(load(name)))
        changed = {k for k in base if cfg[k] != base[k]}
        assert changed and all(k.startswith("objective.adaptive.") for k in changed), (name, changed)
    defaults = dataclasses.asdict(type(code)())
    assert {k for k, v in dataclasses.asdict(code).items() if v != defaults[k]} == {"spread"}
    # on a full paper-scale config too: sd15_adaptive_dpo + the literal reading
    sd15 = ROOT / "configs/train/sd15_adaptive_dpo.yaml"
    ov = [*_required_overrides(TrainConfig), "objective.adaptive.spread_of=h"]
    assert load_config(TrainConfig, sd15, ov).objective.adaptive.spread_of == "h"


def test_tiny_configs_share_the_toy_study_setting():
    """Every tiny_<objective>.yaml runs the study's budget from tiny_base.yaml (200 steps x 16 pairs,
    lr 1e-4, beta 1000) and differs from it in objective and EMA keys only."""
    from pipeline.config import flatten, to_dict
    from pipeline.schema.objective import ObjectiveName
    from pipeline.schema.train import TrainConfig

    def flat(name, *extra):
        path = ROOT / "configs/train" / f"tiny_{name}.yaml"
        return flatten(to_dict(load_config(TrainConfig, path, [*_required_overrides(TrainConfig), *extra])))

    base = flat("base")
    assert (base["train.max_steps"], base["data.micro_batch"], base["optim.lr"], base["objective.beta"]) == (
        200,
        16,
        1e-4,
        1000.0,
    )
    names = [*typing.get_args(ObjectiveName), "adaptive_dpo_calibrated"]
    for name in names:
        cfg = flat(name)
        assert cfg["objective.name"] == name.removesuffix("_calibrated"), name
        changed = {k for k in base if cfg[k] != base[k]}
        assert all(k.startswith(("objective.", "ema.")) for k in changed), (name, changed)


def test_ema_half_life_fractions_follow_train_max_steps():
    """tiny_adaptive_dpo_calibrated: fractions 0.25 and 0.025 of the run; 200 steps -> half-lives 50 and
    5 (the study's values), 400 steps -> 100 and 10 with no other edit. decay = 0.5 ** (1 / half-life)."""
    from pipeline.config import dump_yaml
    from pipeline.schema.train import TrainConfig

    path = ROOT / "configs/train/tiny_adaptive_dpo_calibrated.yaml"
    for steps, want in ((200, [50.0, 5.0]), (400, [100.0, 10.0])):
        cfg = load_config(TrainConfig, path, [*_required_overrides(TrainConfig), f"train.max_steps={steps}"])
        assert cfg.ema.half_lives == pytest.approx(want) and cfg.ema.half_life_fractions == []
        assert cfg.ema.all_decays == pytest.approx([0.5 ** (1 / h) for h in want])
        assert cfg.ema.all_decays[0] ** want[0] == pytest.approx(0.5)
        again = yaml.safe_load(dump_yaml(cfg))  # the resolved config reloads to the same decays
        assert again["ema"]["half_lives"] == pytest.approx(want) and again["ema"]["half_life_fractions"] == []
    with pytest.raises(ConfigError, match=r"ema.half_life_fractions\[0\]: must be > 0, got 0"):
        load_config(TrainConfig, path, [*_required_overrides(TrainConfig), "ema.half_life_fractions=[0]"])
