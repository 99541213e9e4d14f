"""D3PO feedback: scripted rewards and people's labels -> per-pair preferences of a trajectory folder.

The trajectory folders are built by hand here (a tar of prompt groups: json + K small JPEGs of known
brightness or texture, and a manifest), so no model is needed and every expected winner is known."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.d3po import trajectories
from pipeline.d3po.feedback_files import load_preferences
from pipeline.d3po.rewards import (
    Reward,
    brightness,
    flip_unit,
    jpeg_compressibility,
    jpeg_incompressibility,
    make_reward,
    maybe_flip,
    negate,
    pareto,
)
from pipeline.data.flips import is_flipped
from pipeline.errors import UserError
from pipeline.label.export import image_scores
from stages.feedback import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/feedback/tiny.yaml")


# --- building trajectory folders by hand -----------------------------------------------------------


def flat(level: int, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), (level, level, level))


def noisy(mean: int, seed: int, size: int = 16, spread: int = 60) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.clip(mean + rng.integers(-spread, spread + 1, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def key_of(index: int) -> str:
    return hashlib.sha1(f"{index}:prompt {index}".encode()).hexdigest()[:20]


def write_folder(d: Path, groups: list[list[bytes]], shard_size: int = 2) -> list[str]:
    """Shards of prompt groups in the sample stage's layout (json + img{j}.jpg + an array member the
    feedback ignores) and a d3po-trajectories manifest; returns the group keys in order."""
    d.mkdir(parents=True, exist_ok=True)
    keys, shards = [], []
    for s in range(0, len(groups), shard_size):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(s, min(s + shard_size, len(groups))):
                key = key_of(index)
                keys.append(key)
                k = len(groups[index])
                meta = {
                    "prompt": f"prompt {index}",
                    "prompt_index": index,
                    "seed": index,
                    "images": [f"{key}/{j}" for j in range(k)],
                }
                members = [("json", json.dumps(meta).encode()), ("log_probs.npy", b"\x93NUMPY ignored")]
                members += [(f"img{j}.jpg", data) for j, data in enumerate(groups[index])]
                for suffix, data in members:
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        name = f"shard-{len(shards):06d}.tar"
        (d / name).write_bytes(buf.getvalue())
        shards.append(
            {
                "name": name,
                "count": min(shard_size, len(groups) - s),
                "bytes": len(buf.getvalue()),
                "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
            }
        )
    manifest = {"format": "d3po-trajectories", "version": 1, "shards": shards}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return keys


# gray levels of each group's images: K = 2 or 3, one equal pair (a tie) in group 2
LEVELS = [[40, 200], [180, 60, 120], [90, 90, 30], [10, 250]]


@pytest.fixture(scope="module")
def gray(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gray")
    write_folder(d, [[jpeg(flat(v)) for v in levels] for levels in LEVELS])
    return d


def feedback(traj: Path, out: Path, *overrides: str) -> tuple[object, dict]:
    assert cli_main(["--config", CONFIG, f"trajectories={traj}", f"out={out}", *overrides]) == 0
    return load_preferences(out)


def rows_of(table) -> list[dict]:
    return table.to_pylist()


def true_winner(levels: list[int], i: int, j: int) -> int:
    return i if levels[i] > levels[j] else (j if levels[j] > levels[i] else -1)


# --- rewards ------------------------------------------------------------------------------------


def test_brightness_preferences_follow_the_true_brightness(gray, tmp_path):
    """Every pair of every group, in order: the brighter image wins, equal gray levels tie; the values
    are the mean luma; the summary counts add up."""
    table, summary = feedback(gray, tmp_path / "out", "rewards=[brightness]")
    rows = rows_of(table)
    expect = [(g, i, j) for g, lv in enumerate(LEVELS) for i in range(len(lv)) for j in range(i + 1, len(lv))]
    assert [(r["key"], r["i"], r["j"]) for r in rows] == [(key_of(g), i, j) for g, i, j in expect]
    for r, (g, i, j) in zip(rows, expect):
        assert r["winner"] == true_winner(LEVELS[g], i, j), r
        assert r["image_i"] == f"{key_of(g)}/{i}" and r["prompt"] == f"prompt {g}" and r["prompt_index"] == g
        assert r["values_i"][0] == pytest.approx(LEVELS[g][i] / 255, abs=0.01)
        assert r["source"] == "reward:brightness" and not r["flipped"] and r["votes_i"] == 0
    assert summary["groups"] == 4 and summary["pairs"] == len(expect) == 8
    assert summary["ties"] == 1 and summary["decided"] == 7 and summary["flipped"] == 0
    assert summary["names"] == ["brightness"] and summary["skipped"] == {}
    levels = [v for lv in LEVELS for v in lv]
    assert summary["mean_value"]["brightness"] == pytest.approx(np.mean(levels) / 255, abs=0.01)
    assert table.schema.metadata[b"format"] == b"d3po-preferences"


def test_rerun_writes_the_same_bytes_and_a_half_written_folder_is_refused(gray, tmp_path):
    """Idempotent: the same inputs give byte-identical files; a parquet that is not the one its summary
    hashes (a run killed between the two renames) is refused rather than trained on."""
    out = tmp_path / "out"
    feedback(gray, out, "rewards=[brightness]", "flip_rate=0.2")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    feedback(gray, out, "rewards=[brightness]", "flip_rate=0.2")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(first) == ["preferences.parquet", "summary.json"]  # no temporary left behind
    (out / "preferences.parquet").write_bytes(first["preferences.parquet"][:-10] + b"0123456789")
    with pytest.raises(UserError, match="interrupted"):
        load_preferences(out)


def test_negate_reverses_every_decided_pair(gray, tmp_path):
    plain, _ = feedback(gray, tmp_path / "a", "rewards=[brightness]")
    neg, summary = feedback(gray, tmp_path / "b", "rewards=[-brightness]")
    for a, b in zip(rows_of(plain), rows_of(neg), strict=True):
        assert (a["key"], a["i"], a["j"]) == (b["key"], b["i"], b["j"])
        if a["winner"] < 0:
            assert b["winner"] == -1
        else:
            assert b["winner"] == a["i"] + a["j"] - a["winner"]
        assert b["values_i"] == [-a["values_i"][0]]
    assert summary["source"] == "reward:-brightness"
    images = [flat(30), flat(200)]
    r = make_reward("brightness")
    assert negate(r).name == "-brightness" and negate(negate(r)).name == "brightness"
    np.testing.assert_array_equal(negate(r)(images, ["", ""]), -r(images, ["", ""]))
    np.testing.assert_array_equal(make_reward("-brightness")(images, ["", ""]), -r(images, ["", ""]))


def test_pareto_is_a_tie_exactly_when_the_rewards_disagree():
    assert pareto([2.0, 1.0], [1.0, 0.0]) == 1  # better on both
    assert pareto([2.0, 0.0], [1.0, 0.0]) == 1  # better on one, equal on the other
    assert pareto([1.0, 0.0], [2.0, 0.0]) == -1
    assert pareto([2.0, 0.0], [1.0, 1.0]) == 0  # disagree
    assert pareto([0.0, 1.0], [1.0, 0.0]) == 0
    assert pareto([1.0, 1.0], [1.0, 1.0]) == 0  # equal
    assert pareto([np.nan, 2.0], [0.0, 1.0]) == 0  # a NaN decides nothing
    assert pareto(3.0, 2.0) == 1  # one reward: a plain comparison


def test_pareto_of_brightness_and_compressibility_in_the_stage(tmp_path):
    """Group 0: bright+flat vs dark+noisy (both rewards agree: image 0 wins). Group 1: bright+noisy vs
    dark+flat (they disagree: a tie). Group 2: the same flat image twice (equal: a tie)."""
    traj = tmp_path / "traj"
    write_folder(
        traj,
        [
            [jpeg(flat(200)), jpeg(noisy(60, 1))],
            [jpeg(noisy(200, 2)), jpeg(flat(60))],
            [jpeg(flat(128)), jpeg(flat(128))],
        ],
    )
    table, summary = feedback(traj, tmp_path / "out", "rewards=[brightness,jpeg_compressibility]")
    rows = rows_of(table)
    assert [r["winner"] for r in rows] == [0, -1, -1]
    assert all(len(r["values_i"]) == 2 for r in rows)
    assert rows[1]["values_i"][0] > rows[1]["values_j"][0] and rows[1]["values_i"][1] < rows[1]["values_j"][1]
    assert summary["names"] == ["brightness", "jpeg_compressibility"]
    assert summary["source"] == "reward:brightness,jpeg_compressibility"
    # each reward alone decides group 1, in opposite directions
    only_b, _ = feedback(traj, tmp_path / "b", "rewards=[brightness]")
    only_c, _ = feedback(traj, tmp_path / "c", "rewards=[jpeg_compressibility]")
    assert rows_of(only_b)[1]["winner"] == 0 and rows_of(only_c)[1]["winner"] == 1


def test_jpeg_compressibility_prefers_a_flat_image_to_a_noisy_one():
    """Minus the JPEG size at quality 95 in kB of 1000 bytes, as the authors' rewards.py."""
    images = [flat(128, 64), noisy(128, 0, 64)]
    comp, incomp = jpeg_compressibility(images, ["", ""]), jpeg_incompressibility(images, ["", ""])
    assert comp[0] > comp[1] and pareto(comp[0], comp[1]) == 1
    np.testing.assert_array_equal(comp, -incomp)
    buf = io.BytesIO()
    images[1].save(buf, format="JPEG", quality=95)
    assert incomp[1] == buf.tell() / 1000
    b = brightness([flat(0), flat(255), Image.new("RGB", (4, 4), (255, 0, 0))])
    np.testing.assert_allclose(b, [0.0, 1.0, 0.299])


def test_reward_registry_names_and_scorer_folders():
    assert make_reward("jpeg_compressibility").name == "jpeg_compressibility"
    with pytest.raises(UserError, match="scorers.aesthetic"):
        make_reward("aesthetic", {})
    with pytest.raises(UserError, match="unknown"):
        make_reward("sharpness")
    bad = Reward("bad", lambda images, prompts: np.zeros(len(images) + 1))
    with pytest.raises(ValueError, match="2 values for 1 images"):
        bad([flat(0)], [""])


# --- flips --------------------------------------------------------------------------------------


def test_flips_are_deterministic_hash_decisions_with_the_expected_share():
    """Over 4000 decided pairs, rate 0.3 flips ~30% (binomial: 3 sigma ~ 2.2%); the same seed flips the
    same pairs, another seed others; a tie never flips; a flipped pair's winner is the other image."""
    pairs = [(f"g{n // 6}", *ij) for n, ij in enumerate([(0, 1), (0, 2), (1, 2)] * 8000)][:4000]

    def run(seed: int) -> list[bool]:
        return [maybe_flip(i, i, j, g, 0.3, seed)[1] for g, i, j in pairs]

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    assert abs(np.mean(a) - 0.3) < 0.025
    assert maybe_flip(-1, 0, 1, "g", 0.49, 0) == (-1, False)
    for (g, i, j), f in zip(pairs[:50], a):
        assert maybe_flip(i, i, j, g, 0.3, 7) == ((j, True) if f else (i, False))
    assert not any(maybe_flip(i, i, j, g, 0.0, 7)[1] for g, i, j in pairs)


def test_flip_rate_in_the_stage_flips_the_hashed_pairs_and_records_them(tmp_path):
    """60 groups of K = 3 (180 decided pairs): with flip_rate=0.3 the flipped pairs are exactly those
    the hash picks, their winner is reversed against the unflipped run, the share is near 0.3 and the
    summary counts them; flip_by=prompt flips whole groups."""
    traj = tmp_path / "traj"
    rng = np.random.default_rng(0)
    levels = [rng.choice(np.arange(20, 240, 10), 3, replace=False).tolist() for _ in range(60)]
    keys = write_folder(traj, [[jpeg(flat(v)) for v in lv] for lv in levels], shard_size=16)
    clean = rows_of(feedback(traj, tmp_path / "clean", "rewards=[brightness]")[0])
    table, summary = feedback(
        traj, tmp_path / "noisy", "rewards=[brightness]", "flip_rate=0.3", "flip_seed=3"
    )
    rows = rows_of(table)
    assert summary["decided"] == 180 and summary["flipped"] == sum(r["flipped"] for r in rows)
    for c, r in zip(clean, rows, strict=True):
        assert r["flipped"] == is_flipped(flip_unit(r["key"], r["i"], r["j"]), 3, 0.3)
        assert r["winner"] == (r["i"] + r["j"] - c["winner"] if r["flipped"] else c["winner"])
    assert 0.18 < summary["flipped"] / 180 < 0.42
    assert summary["flip"] == {"rate": 0.3, "seed": 3, "by": "pair"}
    again = rows_of(
        feedback(traj, tmp_path / "again", "rewards=[brightness]", "flip_rate=0.3", "flip_seed=3")[0]
    )
    assert [r["flipped"] for r in again] == [r["flipped"] for r in rows]
    by_prompt = rows_of(
        feedback(traj, tmp_path / "p", "rewards=[brightness]", "flip_rate=0.3", "flip_by=prompt")[0]
    )
    for key in keys:
        flips = {r["flipped"] for r in by_prompt if r["key"] == key}
        assert flips == {is_flipped(f"prompt:{key}", 0, 0.3)}


# --- people's labels ----------------------------------------------------------------------------


def write_human(path: Path, labels: list[tuple[str, str, str, int]]) -> Path:
    """image_preferences.jsonl as the labelling export writes it: (annotator, group key, choice, K) per
    best-of-K label, scores from the export's own ``image_scores``."""
    users = {"ann": 1, "bob": 2, "cat": 3}
    with open(path, "w") as f:
        for who, key, choice, k in labels:
            for j, score in image_scores(k, choice):
                line = {
                    "prompt_key": key,
                    "image_key": f"{key}/{j}",
                    "user_id": users[who],
                    "annotator": who,
                    "score": score,
                    "created_at": "2025-01-01T00:00:00+00:00",
                }
                f.write(json.dumps(line) + "\n")
    return path


def test_human_labels_import_with_the_right_winners_and_ties(gray, tmp_path):
    """Group 1 (K=3): ann and bob pick image 2, cat image 0 -> means [1/3, 0, 2/3]: every pair differs.
    Group 0 (K=2): ann ties (0.5, 0.5), bob skips (nothing written) -> a tie. Group 2: ann picks 1, bob
    picks 0 -> [0.5, 0.5, 0]: (0, 1) ties, 2 loses to both. Group 3: nobody -> skipped as unlabelled."""
    k0, k1, k2, _ = (key_of(g) for g in range(4))
    human = write_human(
        tmp_path / "image_preferences.jsonl",
        [
            ("ann", k1, "2", 3),
            ("bob", k1, "2", 3),
            ("cat", k1, "0", 3),
            ("ann", k0, "tie", 2),
            ("bob", k0, "skip", 2),
            ("ann", k2, "1", 3),
            ("bob", k2, "0", 3),
        ],
    )
    table, summary = feedback(gray, tmp_path / "out", "source=human", f"human={human}")
    got = {(r["key"], r["i"], r["j"]): r for r in rows_of(table)}
    assert {p: r["winner"] for p, r in got.items()} == {
        (k0, 0, 1): -1,
        (k1, 0, 1): 0,
        (k1, 0, 2): 2,
        (k1, 1, 2): 2,
        (k2, 0, 1): -1,
        (k2, 0, 2): 0,
        (k2, 1, 2): 1,
    }
    assert got[(k1, 0, 2)]["values_i"] == [pytest.approx(1 / 3)] and got[(k1, 0, 2)]["votes_j"] == 3
    assert got[(k0, 0, 1)]["votes_i"] == 1 and all(r["source"] == "human" for r in got.values())
    assert summary["skipped"] == {"unlabelled": 1} and summary["groups"] == 3
    assert summary["pairs"] == 7 and summary["ties"] == 2 and summary["names"] == ["human"]
    assert summary["human"]["lines"] == 3 * 3 + 2 + 2 * 3 and summary["human"]["unknown_images"] == 0
    # the export folder works as well as the file
    table2, _ = feedback(gray, tmp_path / "out2", "source=human", f"human={tmp_path}")
    assert table2.equals(table)


def test_human_label_of_an_unknown_image_is_an_error_or_a_counted_skip(gray, tmp_path, capsys):
    k0 = key_of(0)
    human = write_human(tmp_path / "prefs.jsonl", [("ann", k0, "1", 2), ("bob", "elsewhere", "0", 2)])
    args = [
        "--config",
        CONFIG,
        f"trajectories={gray}",
        f"out={tmp_path / 'out'}",
        "source=human",
        f"human={human}",
    ]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "image_key 'elsewhere/0'" in err and "prefs.jsonl:3" in err, err
    assert not (tmp_path / "out").exists()
    table, summary = feedback(gray, tmp_path / "out", "source=human", f"human={human}", "unknown_images=skip")
    assert summary["human"]["unknown_images"] == 2 and [r["winner"] for r in rows_of(table)] == [1]
    assert summary["skipped"] == {"unlabelled": 3}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"image_key": "a/0", "score": 2}', "score"),
        ('{"score": 1}', "image_key"),
        ("not json", "not valid JSON"),
    ],
)
def test_malformed_human_lines_name_the_line(gray, tmp_path, capsys, line, message):
    f = tmp_path / "p.jsonl"
    f.write_text(f'{{"image_key": "{key_of(0)}/0", "score": 1}}\n{line}\n')
    assert (
        cli_main(
            [
                "--config",
                CONFIG,
                f"trajectories={gray}",
                f"out={tmp_path / 'o'}",
                "source=human",
                f"human={f}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{f}:2" in err and message in err, err


# --- bad input ----------------------------------------------------------------------------------


def test_a_corrupt_jpeg_skips_its_group_and_is_counted(tmp_path, caplog):
    """Garbage bytes and a truncated JPEG each skip their group; a one-image sample is malformed."""
    traj = tmp_path / "traj"
    good = jpeg(flat(100))
    truncated = jpeg(noisy(100, 0))[:200]
    groups = [[good, jpeg(flat(50))], [good, b"not a jpeg at all"], [truncated, good], [good, good], [good]]
    write_folder(traj, groups)
    table, summary = feedback(traj, tmp_path / "out", "rewards=[brightness]")
    assert summary["skipped"] == {"corrupt_image": 2, "malformed_group": 1} and summary["groups"] == 2
    assert [r["key"] for r in rows_of(table)] == [key_of(0), key_of(3)]
    assert "does not decode" in caplog.text


def test_a_damaged_folder_is_one_line_exit_2(gray, tmp_path, capsys):
    def run(traj) -> str:
        assert (
            cli_main(
                ["--config", CONFIG, f"trajectories={traj}", f"out={tmp_path / 'o'}", "rewards=[brightness]"]
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        return err

    assert "no manifest" in run(tmp_path / "nothing")
    broken = tmp_path / "broken"
    write_folder(broken, [[jpeg(flat(1)), jpeg(flat(2))]])
    (broken / "shard-000000.tar").write_bytes(b"x" * 10)
    assert "sha256 differs" in run(broken)
    assert (
        cli_main(
            [
                "--config",
                CONFIG,
                f"trajectories={broken}",
                f"out={tmp_path / 'o'}",
                "rewards=[brightness]",
                "verify=false",
            ]
        )
        == 2
    )
    assert "not a readable tar" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, messages",
    [
        (["rewards=[brigthness]"], ["rewards[0]", "did you mean 'brightness'"]),
        (["rewards=[brightness]", "flip_rate=0.5"], ["flip_rate: must be in [0, 0.5)"]),
        (["rewards=[brightness]", "flip_rate=-0.1"], ["flip_rate"]),
        (["rewards=[brightness]", "flip_rat=0.1"], ["flip_rat: unknown key (did you mean 'flip_rate'?)"]),
        (["rewards=[]"], ["rewards: must be non-empty"]),
        (["source=human"], ["human: required with source=human"]),
        (["human=x.jsonl"], ["human: given (x.jsonl) but source=rewards"]),
        (["source=people"], ["source: expected one of 'rewards', 'human'"]),
        (["rewards=[aesthetic]"], ["scorers.aesthetic: required"]),
        (["rewards=[brightness,-brightness]"], ["brightness is named more than once"]),
        (["rewards=[brightness]", "unknown_images=ignore"], ["unknown_images", "'error', 'skip'"]),
    ],
)
def test_config_errors_exit_2_naming_the_key(tmp_path, capsys, overrides, messages):
    args = ["--config", CONFIG, f"trajectories={tmp_path}", f"out={tmp_path / 'out'}", *overrides]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    for m in messages:
        assert m in err, err
    assert not (tmp_path / "out").exists()


def test_the_reader_agrees_with_the_sample_stage_format(tmp_path):
    """A group encoded by ``pipeline.d3po.trajectories`` (the sample stage's writer) reads back with its
    image keys, prompt and JPEGs; the arrays are not needed."""
    k, n = 3, 2
    key = trajectories.group_key(5, "a cat")
    arrays = {
        "latents": np.zeros((k, n + 1, 4, 2, 2), np.float16),
        "log_probs": np.zeros((k, n), np.float32),
        "timesteps": np.arange(n, dtype=np.int64),
        "txt": np.zeros((77, 8), np.float16),
    }
    jpegs = [jpeg(flat(v)) for v in (10, 200, 100)]
    meta = {"prompt": "a cat", "prompt_index": 5, "seed": 1, "images": [f"{key}/{j}" for j in range(k)]}
    sample = trajectories.encode_group(key, arrays, jpegs, meta)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for suffix, data in sample.items():
            if suffix != "__key__":
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shard-000000.tar").write_bytes(buf.getvalue())
    shard = {"name": "shard-000000.tar", "count": 1, "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    manifest = {"format": trajectories.FORMAT, "version": trajectories.VERSION, "shards": [shard]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (g,) = list(trajectories.iter_groups(tmp_path, trajectories.read_manifest(tmp_path)))
    assert (g.key, g.prompt, g.prompt_index, g.image_keys, g.jpegs) == (
        key,
        "a cat",
        5,
        meta["images"],
        jpegs,
    )
    table, _ = feedback(tmp_path, tmp_path / "out", "rewards=[brightness]")
    assert [r["winner"] for r in rows_of(table)] == [1, 2, 1]


def test_aesthetic_reward_is_the_evaluation_scorer(tmp_path):
    """rewards=[aesthetic] scores with ``pipeline.evaluate.scorers.AestheticScorer`` from a local folder
    (the tiny stand-in: its values mean nothing, but they are the scorer's, and decide the pairs), with
    both groups' 5 images in one scorer call and the values split back per group."""
    import torch

    from pipeline.evaluate.scorers import AestheticScorer
    from tools.toy.make_tiny_scorers import make_tiny_scorers

    folder = make_tiny_scorers(tmp_path / "scorers") / "aesthetic"
    traj = tmp_path / "traj"
    groups = [[jpeg(flat(30)), jpeg(noisy(120, 1)), jpeg(flat(220))], [jpeg(noisy(60, 2)), jpeg(flat(90))]]
    write_folder(traj, groups)
    table, summary = feedback(
        traj, tmp_path / "out", "rewards=[aesthetic]", f"scorers.aesthetic={folder}", "scorers.batch_size=4"
    )  # both groups in one call
    scorer = AestheticScorer(str(folder), torch.device("cpu"), torch.float32)
    rows = rows_of(table)
    for r in rows:
        g = [key_of(0), key_of(1)].index(r["key"])
        images = [Image.open(io.BytesIO(groups[g][x])).convert("RGB") for x in (r["i"], r["j"])]
        want = scorer.score(images, ["", ""])
        assert [r["values_i"][0], r["values_j"][0]] == pytest.approx(want.tolist(), rel=1e-5)
        assert r["winner"] == (r["i"] if want[0] > want[1] else r["j"] if want[1] > want[0] else -1)
    assert summary["pairs"] == 4 and summary["names"] == ["aesthetic"]


def test_random_reward_is_a_fixed_coin_per_image_unrelated_to_brightness():
    """The control reward: the same pixels give the same value, values spread over [0, 1) (mean ~1/2,
    s.e. 0.009 over 1000 images) and do not follow brightness (|correlation| < 0.1; 3 s.e. ~ 0.095)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(1000)]
    v = make_reward("random")(images, [""] * len(images))
    again = make_reward("random")([images[3], images[3].copy()], ["", ""])
    assert again[0] == again[1] == v[3]
    assert np.all((v >= 0) & (v < 1)) and abs(v.mean() - 0.5) < 0.03 and len(set(v.tolist())) == 1000
    bright = make_reward("brightness")(images, [""] * len(images))
    assert abs(np.corrcoef(v, bright)[0, 1]) < 0.1
