"""Atomic writes: an interrupted write leaves the previous file whole and no temporary file behind."""

import pytest

from ddp_finetune.files import atomic_path, atomic_write_text


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_write_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    atomic_write_text(path, "kept\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ddp_finetune.files.os.fsync", disk_full)  # after the text went to the temporary file
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "half of a new file")
    assert path.read_text() == "kept\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_atomic_path_moves_only_a_finished_file(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old picture")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # writers choose the format by the suffix
        tmp.write_bytes(b"half")
        raise RuntimeError("the plot failed")
    assert path.read_bytes() == b"old picture"
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"new picture")
    assert path.read_bytes() == b"new picture"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
