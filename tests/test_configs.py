"""Every shipped config in configs/ loads, and the distillation ones are wired to a teacher and known methods.

Only parsing and cross-checks: no model is built, no data is read (paths like /path/to/kitti are placeholders).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aidkd.distill.aid import GRANULARITIES
from aidkd.distill.registry import METHODS, method_params
from aidkd.engine.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
IDS = [p.name for p in CONFIGS]


def _all() -> dict[str, RunConfig]:
    return {p.stem: load_config(p) for p in CONFIGS}


def test_there_are_configs():
    assert len(CONFIGS) >= 10, f"expected the shipped configs in {CONFIG_DIR}"
    # the paper's settings and the small CPU ones are all there
    names = {p.stem for p in CONFIGS}
    for dataset in ("kitti", "coco_traffic"):
        for arch in ("gfl", "frcnn"):
            assert f"{dataset}_{arch}_r101_teacher" in names
            assert f"{dataset}_{arch}_r101_self_kd_aid" in names
            for size in ("r50", "r18"):
                for kind in ("student", "kd", "kd_aid"):
                    assert f"{dataset}_{arch}_{size}_{kind}" in names
    assert any(n.startswith("synth_") for n in names)
    assert any(n.startswith("kitti101_") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == path.stem
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(cfg.to_dict())
    if cfg.distill is None:
        assert "distill" not in raw or raw["distill"] is None


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_distill_config_is_wired(path: Path):
    cfg = load_config(path)
    if cfg.distill is None:
        return
    d = cfg.distill
    assert d.teacher.checkpoint, f"{path.name}: distill config without teacher checkpoint"
    assert d.methods, f"{path.name}: distill config without methods"
    for m in d.methods:
        assert m.name in METHODS, f"{path.name}: unknown method {m.name!r}"
        unknown = set(m.params) - set(method_params(m.name))
        assert not unknown, f"{path.name}: unknown {m.name} parameter(s) {sorted(unknown)}"
    assert d.aid.granularity in GRANULARITIES
    assert d.aid.alpha >= 0


def test_teachers_are_trained_by_a_shipped_config():
    """Each distill config's teacher checkpoint is ``<output_dir>/model_best.pt`` of a shipped non-distill config
    with the same detector family and the same data (classes, image size), so the chain runs as documented."""
    cfgs = _all()
    producers = {str(Path(c.output_dir) / "model_best.pt"): (n, c) for n, c in cfgs.items() if c.distill is None}
    for name, cfg in cfgs.items():
        if cfg.distill is None:
            continue
        ckpt = cfg.distill.teacher.checkpoint
        assert ckpt in producers, f"{name}: no shipped config writes the teacher {ckpt}"
        tname, tcfg = producers[ckpt]
        assert tcfg.model.arch == cfg.model.arch, f"{name}: teacher {tname} is {tcfg.model.arch}"
        for key in ("format", "root", "classes", "min_size", "max_size", "train_ann", "train_split_file"):
            assert getattr(tcfg.data, key) == getattr(cfg.data, key), f"{name} vs teacher {tname}: data.{key}"


def test_output_dirs_are_unique():
    cfgs = _all()
    seen: dict[str, str] = {}
    for name, cfg in cfgs.items():
        assert cfg.output_dir not in seen, f"{name} and {seen.get(cfg.output_dir)} share {cfg.output_dir}"
        seen[cfg.output_dir] = name


def test_paper_settings():
    """method.md §4: R101 teachers 24 epochs, students 12, SGD 0.9 / 1e-4, 1333 x 800, the published weights."""
    for name, cfg in _all().items():
        if not name.startswith(("kitti_", "coco_traffic_")):
            continue
        assert (cfg.data.min_size, cfg.data.max_size) == (800, 1333), name
        assert cfg.train.optimizer == "sgd" and cfg.train.momentum == 0.9 and cfg.train.weight_decay == 1e-4, name
        expected = 24 if name.endswith("_teacher") else 12
        assert cfg.train.epochs == expected, name
        if name.endswith("_teacher"):
            assert cfg.model.backbone == "resnet101", name
        if cfg.distill is not None and "_pkd" in name:
            assert [(m.name, m.params) for m in cfg.distill.methods] == [("pkd", {"pkd_weight": 6.0})], name
            assert cfg.distill.aid.enabled == name.endswith("_aid"), name
        elif cfg.distill is not None:
            att = next(m for m in cfg.distill.methods if m.name == "attention").params
            one_stage = cfg.model.arch == "gfl"
            assert att["temperature"] == (0.1 if one_stage else 0.5), name
        if name.startswith("kitti_"):
            assert cfg.data.format == "kitti" and cfg.data.classes == ["Car", "Pedestrian", "Cyclist"], name
        else:
            assert cfg.data.format == "coco", name


def test_configs_match_generator(load_benchmark):
    """configs/*.yaml are what benchmarks/make_configs.py writes (so its table stays the source of truth)."""
    assert load_benchmark("make_configs").main(["--check"]) == 0
