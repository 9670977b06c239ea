"""A 2-process DDP run on the CPU (gloo) through the same Lightning path as multi-GPU and multi-node runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aidkd.engine.config import config_from_dict, dump_config
from aidkd.eval import read_metrics
from aidkd.models import build_detector, model_meta, save_model_file

DDP = ["--set", "train.strategy=ddp", "train.devices=2", "train.accelerator=cpu", "train.max_steps=4",
       "train.epochs=5"]


def _run(cfg_dict, tmp_path, command):
    cfg = config_from_dict(cfg_dict)
    path = tmp_path / f"{cfg.name}.yaml"
    dump_config(cfg, path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "aidkd.cli.main", command, str(path), *DDP], env=env, check=False,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return cfg, done.stdout + done.stderr


@pytest.mark.slow
def test_ddp_train_and_distill_two_processes(tiny_cfg, tmp_path):
    cfg, log = _run(tiny_cfg("ddp_train"), tmp_path, "train")
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    ckpt = torch.load(os.path.join(cfg.output_dir, "checkpoints", "last.ckpt"), weights_only=True)
    assert ckpt["global_step"] >= 2  # one epoch = 2 steps per rank

    teacher = build_detector("retinanet", "resnet18", 4, min_size=64, max_size=192, fpn_channels=32)
    tfile = save_model_file(tmp_path / "teacher.pt", teacher, model_meta(teacher, ["Car", "Pedestrian", "Cyclist"],
                                                                         64, 192, {}))
    dcfg, log = _run(tiny_cfg("ddp_distill", distill={
        "teacher": {"checkpoint": str(tfile)}, "methods": [{"name": "attention"}, {"name": "nonlocal"}],
        "aid": {"enabled": True}}), tmp_path, "distill")
    ckpt = torch.load(os.path.join(dcfg.output_dir, "checkpoints", "last.ckpt"), weights_only=True)
    assert ckpt["global_step"] >= 2  # one epoch = 2 steps per rank
    # only the student and the distillation modules (whose non-local block on the teacher side is trainable)
    assert all(k.startswith(("model.", "distiller.methods.")) for k in ckpt["state_dict"]), "student saved once"
    assert not any(k.startswith("distiller.teacher") for k in ckpt["state_dict"]), "teacher must not be saved"
    assert any(k.startswith("distiller.methods.") for k in ckpt["state_dict"])
    metrics = read_metrics(Path(dcfg.output_dir, "final_metrics.json").read_text())
    assert "coco/AP" in metrics


_NAN_ON_RANK_1 = '''
import os, sys
import torch
from aidkd.engine import module
real = module.detection_losses
calls = {"n": 0}
def flaky(*args, **kwargs):
    losses = real(*args, **kwargs)
    calls["n"] += 1
    if os.environ.get("LOCAL_RANK") == "1" and calls["n"] == 2:  # one bad step, on one process only
        losses["classification"] = losses["classification"] * float("nan")
    return losses
module.detection_losses = flaky
from aidkd.cli.main import main
sys.exit(main())
'''


@pytest.mark.slow
def test_ddp_non_finite_step_on_one_process_is_skipped_on_all(tiny_cfg, tmp_path):
    """A non-finite loss on one rank: every rank skips that step (before: Lightning refused the None step)."""
    cfg = config_from_dict(tiny_cfg("ddp_nan"))
    path = tmp_path / "ddp_nan.yaml"
    dump_config(cfg, path)
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(_NAN_ON_RANK_1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # max_bad_steps 2: the step-1 skip is out of last.ckpt's look-back window (2 steps) by step 4
    done = subprocess.run([sys.executable, str(script), "train", str(path), *DDP, "train.max_bad_steps=2"], env=env, check=False,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "step 1: non-finite loss in classification; step skipped" in log  # rank 1
    assert "step 1: non-finite loss in another process; step skipped" in log  # rank 0, from the synced flag
    ckpt = torch.load(os.path.join(cfg.output_dir, "checkpoints", "last.ckpt"), weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
