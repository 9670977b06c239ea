"""data.format safety: generated scenes never overwrite a real dataset; a root of another format is an error that
says which data.format to set; data.format is required with data.root."""
from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from aidkd.data import DatasetError, generate_synth
from aidkd.data.layout import SYNTH_MARKER, detect_layout, format_mismatch
from aidkd.engine.config import ConfigError, config_from_dict, load_config
from aidkd.engine.datamodule import DetectionDataModule, ensure_synth, load_records


def _kitti_copy(root):
    (root / "training" / "image_2").mkdir(parents=True)
    (root / "training" / "label_2").mkdir(parents=True)
    Image.new("RGB", (64, 32), (10, 20, 30)).save(root / "training" / "image_2" / "000000.png")
    (root / "training" / "label_2" / "000000.txt").write_text(
        "Car 0.00 0 -1.0 2.0 3.0 30.0 20.0 1.5 1.6 3.9 1.0 1.7 20.0 0.0\n")
    return root


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_refuses_a_folder_it_did_not_write(tmp_path):
    kitti = _kitti_copy(tmp_path / "kitti")
    before = _digest(kitti)
    with pytest.raises(DatasetError, match=r"refusing to generate .*kitti.*data\.format: kitti"):
        generate_synth(kitti, 4, width=64, height=32)
    assert _digest(kitti) == before  # nothing written, nothing deleted
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine\n")
    with pytest.raises(DatasetError, match="notes"):
        generate_synth(other, 2, width=64, height=32)
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]


def test_generate_rewrites_its_own_folder(tmp_path):
    out = generate_synth(tmp_path / "s", 3, width=64, height=32)
    marker = json.loads((out / SYNTH_MARKER).read_text())
    assert marker["generator"] == "aidkd.data.synth" and marker["num_images"] == 3
    generate_synth(out, 2, width=64, height=32)  # its own folder: regenerated (stale files removed)
    assert sorted(p.name for p in (out / "training" / "image_2").iterdir()) == ["000000.png", "000001.png"]
    assert detect_layout(out) == "synth"


def test_synth_format_on_a_kitti_root_names_the_format_to_set(tmp_path):
    kitti = _kitti_copy(tmp_path / "kitti")
    before = _digest(kitti)
    cfg = config_from_dict({"data": {"format": "synth", "root": str(kitti)}}).data
    with pytest.raises(DatasetError, match=r"looks like a KITTI dataset .* data\.format is synth; set data\.format: kitti"):
        ensure_synth(cfg)
    with pytest.raises(DatasetError, match="set data.format: kitti"):
        DetectionDataModule(cfg).prepare_data()
    assert _digest(kitti) == before
    # the format it names works
    ok = config_from_dict({"data": {"format": "kitti", "root": str(kitti), "val_fraction": 0.0}}).data
    assert [r.stem for r in load_records(ok, "train", ["Car"])] == ["000000"]


def test_other_way_round(tmp_path):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_val.json").write_text('{"images": [], "annotations": [], "categories": []}')
    assert detect_layout(coco) == "coco"
    assert format_mismatch(coco, "kitti").endswith("set data.format: coco")
    assert format_mismatch(coco, "synth").endswith("set data.format: coco")
    cfg = config_from_dict({"data": {"format": "kitti", "root": str(coco)}}).data
    with pytest.raises(DatasetError, match="set data.format: coco"):
        load_records(cfg, "train", ["Car"])
    synth = generate_synth(tmp_path / "s", 2, width=64, height=32)
    assert format_mismatch(synth, "kitti") is None  # generated scenes are KITTI layout: reading them so is fine
    assert "set data.format: synth" in format_mismatch(synth, "coco")


def test_format_is_required_with_a_root(tmp_path):
    kitti = _kitti_copy(tmp_path / "kitti")
    with pytest.raises(ConfigError, match=r"'data\.format' is required when data\.root is given \(.*looks like kitti"):
        config_from_dict({"data": {"root": str(kitti)}})
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  root: {tmp_path / 'new'}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: config key 'data\.format' is required"):
        load_config(path)
    assert load_config(path, ["data.format=synth"]).data.format == "synth"
    assert config_from_dict({}).data.format == "synth"  # no root: the synth cache, as before


def test_changed_synth_parameters_regenerate_the_folder(tmp_path):
    root = tmp_path / "s"
    cfg = config_from_dict({"data": {"format": "synth", "root": str(root),
                                     "synth": {"num_images": 3, "width": 64, "height": 32}}}).data
    ensure_synth(cfg)
    assert len(list((root / "training" / "image_2").iterdir())) == 3
    cfg.synth.num_images = 5
    ensure_synth(cfg)  # .complete alone would have kept the 3 old scenes
    assert len(list((root / "training" / "image_2").iterdir())) == 5
