"""aidkd.models.weights: atomic writes, non-finite refusal, safe loading, compatibility messages."""
from __future__ import annotations

import os

import pytest
import torch

from aidkd.models.weights import (
    CheckpointError,
    NonFiniteCheckpointError,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)


def test_roundtrip(tmp_path):
    state = {"state_dict": {"w": torch.randn(3, 2), "n": torch.tensor(4)}, "meta": {"arch": "fcos"}, "epoch": 3}
    path = save_checkpoint(tmp_path / "sub" / "a.pt", state)
    back = load_checkpoint(path)
    assert torch.equal(back["state_dict"]["w"], state["state_dict"]["w"]) and back["epoch"] == 3
    assert os.listdir(tmp_path / "sub") == ["a.pt"]


def test_non_finite_refused_and_old_file_kept(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(path, {"w": torch.ones(2)})
    bad = {"model": {"layer": [torch.ones(2), torch.tensor([1.0, float("nan")])]}, "ints": torch.tensor([1, 2])}
    with pytest.raises(NonFiniteCheckpointError, match=r"model\.layer\.1"):
        save_checkpoint(path, bad)
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(path, {"x": torch.tensor([float("inf")])})
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["a.pt"]


def test_finite_check_can_be_limited_to_named_entries(tmp_path):
    # Lightning callback state legitimately holds inf (ModelCheckpoint's kth_value before its first save)
    state = {"state_dict": {"w": torch.ones(2)}, "callbacks": {"best": torch.tensor(float("-inf"))}}
    save_checkpoint(tmp_path / "a.pt", state, finite_keys=("state_dict", "optimizer_states"))
    assert load_checkpoint(tmp_path / "a.pt")["callbacks"]["best"] == float("-inf")
    state["state_dict"]["w"][0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match=r"state_dict\.w"):
        save_checkpoint(tmp_path / "b.pt", state, finite_keys=("state_dict", "optimizer_states"))


def test_failure_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    save_checkpoint(path, {"w": torch.ones(2)})
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(2)})
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "new.pt", {"w": torch.zeros(2)})
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path) == ["a.pt"]  # no temp file left, no partial new.pt
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))  # old content intact


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    save_checkpoint(corrupt, {"w": torch.ones(100)})
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(junk)
    tensor_only = tmp_path / "t.pt"
    torch.save(torch.ones(2), tensor_only)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tensor_only)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_load_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_check_compatible_names_each_mismatch():
    meta = {"arch": "retinanet", "backbone": "resnet50", "num_classes": 4, "fpn_channels": 256}
    check_compatible(meta, dict(meta), ["Car", "Pedestrian", "Cyclist"], ["Car", "Pedestrian", "Cyclist"])
    check_compatible(None, meta, None, ["Car"])  # unknown -> not checked
    with pytest.raises(ValueError) as e:
        check_compatible(meta, {"arch": "fcos", "backbone": "resnet18", "num_classes": 3, "fpn_channels": 256},
                         ["Car", "Pedestrian", "Cyclist"], ["Car", "Cyclist"])
    msg = str(e.value)
    for part in ("arch: checkpoint has 'retinanet', expected 'fcos'", "backbone", "3 classes (+ background) in the checkpoint, 2 expected",
                 "class names", "3 classes vs 2", "#1: 'Pedestrian' vs 'Cyclist'"):
        assert part in msg, (part, msg)
    assert "fpn_channels" not in msg
