"""pipeline.io: files replaced in one rename, a full disk as one line, .npy bytes that never pickle,
JSON lines whose errors name the line."""

from __future__ import annotations

import errno
import io
import json
import os

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.io import atomic_write_bytes, npy_bytes, read_jsonl, write_json_atomic


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_naming_the_file_system_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def full(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError) as e:
        atomic_write_bytes(path, b"new")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"writing {path}: {os.strerror(code).lower()}")
    assert "on the file system at /" in message and "run the same command again" in message
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # the temporary is removed


def test_other_write_errors_are_not_hidden(tmp_path, monkeypatch):
    def broken(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert not list(tmp_path.iterdir())


def test_json_is_sorted_indented_and_ends_with_a_newline(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [2]})
    assert (tmp_path / "a.json").read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'
    write_json_atomic(tmp_path / "b.json", {"b": 1, "a": 2}, indent=2)
    assert json.loads((tmp_path / "b.json").read_text()) == {"a": 2, "b": 1}
    assert (tmp_path / "b.json").read_text().startswith('{\n  "a"')


def test_npy_bytes_round_trip_without_pickle():
    a = np.arange(12, dtype=np.float16).reshape(3, 4).T  # not C-contiguous
    back = np.load(io.BytesIO(npy_bytes(a)), allow_pickle=False)
    assert back.dtype == np.float16 and np.array_equal(back, a)


def test_json_lines_skip_blank_lines_and_name_a_bad_one(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]
    for bad, message in (("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")):
        path.write_text('{"a": 1}\n' + bad + "\n")
        with pytest.raises(UserError, match=rf"^{path}:2: {message}"):
            list(read_jsonl(path))
