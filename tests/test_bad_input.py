"""Bad input never kills a job: each kind is a clear one-line refusal naming the file, key or column, or
a counted skip that keeps the good rows (decompression and aspect-ratio bombs, wrong column types, null
ids, records that do not add up, a full disk, string-dtype arrays in a shard, shards that fail
``data.verify_sha256``)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.images import ImageDecodeError, prepare
from pipeline.data.manifest import merge_manifest
from pipeline.errors import UserError
from pipeline.metrics_log import read_metrics
from stages.encode import cli_main
from tests.conftest import encode_args
from tests.helpers.run import train
from tools.toy.make_pickapic import SCHEMA, make_rows, write_parquet


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, with one tiny IDAT: a bomb by its header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_bombs_are_refused_before_any_pixel_is_decoded():
    with pytest.raises(ImageDecodeError) as e:  # past PIL's own limit: its DecompressionBombError, caught
        prepare(_png_header(30000, 30000), 64)
    assert e.value.reason == "image_too_large"
    with pytest.raises(ImageDecodeError) as e:  # under PIL's limit, over ours: refused from the header
        prepare(_png_header(9000, 9000), 64)
    assert e.value.reason == "image_too_large" and "9000x9000" in str(e.value)
    bomb = _png(1, 20000)
    assert len(bomb) < 100_000  # a few KB that would be resized to 512 x 10,240,000 px
    with pytest.raises(ImageDecodeError) as e:
        prepare(bomb, 512)
    assert e.value.reason == "extreme_aspect" and "512x10240000" in str(e.value)
    assert prepare(_png(64, 1000), 64).pixels.shape == (3, 64, 64)  # 15.6:1 is still an image


def test_one_bad_row_of_each_kind_is_counted_and_the_good_rows_are_kept(tiny_sd15, tmp_path):
    rows = make_rows(24, seed=3, tie_rate=0, unlabelled_rate=0, identical_rate=0)
    rows[2]["jpg_0"] = _png_header(30000, 30000)
    rows[5]["jpg_1"] = _png_header(9000, 9000)
    rows[9]["jpg_0"] = _png(1, 20000)
    rows[13]["user_id"] = None
    src = tmp_path / "src"
    write_parquet(rows, src, rows_per_file=12)
    out = tmp_path / "out"
    assert cli_main(encode_args(tiny_sd15, src, out, "output.shard_size=8")) == 0
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["skipped"] == {"extreme_aspect": 1, "image_too_large": 2, "null_id": 1}
    assert c["rows_read"] == 24 and c["pairs"] == 20
    assert m["skipped_ranking_ids"]["image_too_large"] == sorted(
        [rows[2]["ranking_id"], rows[5]["ranking_id"]]
    )


def test_wrong_column_types_are_named_with_their_file_all_at_once(tiny_sd15, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    rows = make_rows(4, seed=0)
    bad = {"label_0": pa.string(), "jpg_0": pa.string(), "caption": pa.int64()}
    for i, (col, typ) in enumerate(bad.items()):
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        data = pa.array([str(v) if typ == pa.string() else i for v in table[col].to_pylist()], type=typ)
        pq.write_table(
            table.set_column(table.schema.get_field_index(col), col, data), src / f"part-{i}.parquet"
        )
    assert cli_main(encode_args(tiny_sd15, src, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{src / 'part-0.parquet'}: column label_0 has type string, expected a number" in err
    assert f"{src / 'part-1.parquet'}: column jpg_0 has type string, expected binary (image bytes)" in err
    assert f"{src / 'part-2.parquet'}: column caption has type int64, expected a string" in err


def test_shard_records_that_do_not_add_up_are_refused(shards16, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(shards16, d)
    side = d / "shard-000000.json"
    rec = json.loads(side.read_text())
    side.write_text(json.dumps(dict(rec, count=rec["count"] - 1)))
    with pytest.raises(UserError, match=r"shard-000000.tar: its record says \d+ pairs \+ 0 skipped rows"):
        merge_manifest(d)


def test_a_full_disk_is_one_line_and_the_same_command_resumes(
    tiny_sd15, pickapic_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    real_fsync = os.fsync  # every file is fsynced before its rename (pipeline.io.write_temporary)

    def fsync(fd):  # the disk fills up while shard 1's tar is written
        if ".shard-000001.tar.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert cli_main(encode_args(tiny_sd15, pickapic_dir, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "shard-000001.tar: no space left on device on the file system at /" in err[-1]
    assert "run the same command again" in err[-1]
    assert not [f for f in out.iterdir() if "tmp" in f.name]  # no temporary left to fill the disk
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert cli_main(encode_args(tiny_sd15, pickapic_dir, out)) == 0
    cap = capsys.readouterr()
    assert "1 already finished" in cap.out + cap.err


def _rewrite_first_sample(src: Path, dst: Path, **replace) -> None:
    import webdataset as wds

    from pipeline.data.shards import decode_sample, encode_sample, iter_tar_samples

    with wds.TarWriter(str(dst), encoder=False) as w:
        for i, raw in enumerate(iter_tar_samples(src)):
            s = decode_sample(raw)
            arrays = {k: s[k] for k in ("lat_w", "lat_l", "txt") if k in s}
            w.write(encode_sample(s["__key__"], {**arrays, **(replace if i == 0 else {})}, s["meta"]))


@pytest.mark.slow
def test_a_string_dtype_array_is_substituted_and_counted(shards16, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(shards16, d)
    _rewrite_first_sample(shards16 / "shard-000000.tar", d / "shard-000000.tar", lat_w=np.array(["x"] * 4))
    out = tmp_path / "run"
    p = train(d, out, "train.max_steps=4", "checkpoint.export=false", "checkpoint.every=4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "lat_w.npy is <U1 [4], the manifest says float16" in p.stderr
    m = read_metrics(out / "metrics.jsonl")
    assert sum(r["substituted"] for r in m) >= 1 and all(np.isfinite(r["loss"]) for r in m)


@pytest.mark.slow
def test_verify_sha256_refuses_a_changed_shard_on_every_rank(shards16, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(shards16, d)
    t = d / "shard-000000.tar"
    data = bytearray(t.read_bytes())
    data[-2000] ^= 1  # one bit: the tar still reads, its sha256 differs from the manifest's
    t.write_bytes(bytes(data))
    p = train(d, tmp_path / "run", "data.verify_sha256=true", nproc=2, timeout=300)
    assert p.returncode != 0
    assert p.stderr.count("data.verify_sha256: 1 file(s)") == 2, p.stderr[-3000:]  # both ranks refuse
    assert "shard-000000.tar; re-encode them" in p.stderr and "SIGABRT" not in p.stderr
    assert not re.search(r'File ".*/(pipeline|stages)/', p.stderr)  # torchrun's own report, no trace of ours
