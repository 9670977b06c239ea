"""What a careless or hostile user can do to aidkd, and what aidkd promises in return (docs/failure-behaviour.md).

One section per kind of input; one test per case. To add a case:
put it under its section, make it fail on the code you are fixing, and assert on the message or the files, not only
on "it did not crash".
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from aidkd.cli.main import main
from aidkd.engine.config import config_from_dict, dump_config
from aidkd.engine.run import train
from aidkd.engine.run_folder import RunFolderError, RunFolderLock
from tests.conftest import QUICK


def _yaml(cfg_dict: dict, path: Path) -> Path:
    dump_config(config_from_dict(cfg_dict), path)
    return path


def _error_line(capsys) -> str:
    out = capsys.readouterr()
    text = (out.out + out.err).strip()
    assert "Traceback" not in text
    return text.splitlines()[-1] if text else ""


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ run folders are never clobbered
def test_new_run_into_an_existing_run_folder_is_refused_and_touches_nothing(finished_run, tmp_path, capsys):
    raw, out = finished_run
    before = _snapshot(out)
    rc = main(["train", str(_yaml(raw, tmp_path / "again.yaml"))])
    assert rc == 2
    line = _error_line(capsys)
    assert f"output_dir {out} is not empty" in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(out) == before


def test_failed_start_writes_nothing(tiny_cfg, tmp_path, capsys):
    raw = tiny_cfg("no_teacher", distill={"teacher": {"checkpoint": str(tmp_path / "missing.pt")},
                                          "methods": [{"name": "attention"}]})
    rc = main(["distill", str(_yaml(raw, tmp_path / "d.yaml"))])
    assert rc == 2
    assert "missing.pt" in _error_line(capsys)
    assert not Path(raw["output_dir"]).exists()


def test_second_run_on_a_locked_folder_is_refused(tiny_cfg):
    cfg = config_from_dict(tiny_cfg("locked", train=QUICK))
    with RunFolderLock(Path(cfg.output_dir)), pytest.raises(RunFolderError, match="in use by another aidkd run"):
        train(cfg)
    assert not (Path(cfg.output_dir) / "config.yaml").exists()


def test_overwrite_replaces_the_previous_run(finished_run, tmp_path):
    raw, out = finished_run
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    (copy / "checkpoints" / "best-v1.ckpt").write_bytes(b"old")
    train(config_from_dict(dict(raw, output_dir=str(copy))), overwrite=True)
    history = (copy / "metrics_history.jsonl").read_text().splitlines()
    assert len(history) == 1  # the old run's line is gone, not mixed with the new one
    assert not (copy / "checkpoints" / "best-v1.ckpt").exists()  # (a user's file elsewhere: refused, see
    # test_hostile_run_folders.py)


# ------------------------------------------------------------------ what --resume resumes
def test_resume_accepts_the_run_folder(finished_run, tmp_path):
    raw, out = finished_run
    run = tmp_path / "run"
    import shutil

    shutil.copytree(out, run)
    other = dict(raw, output_dir=str(tmp_path / "elsewhere"), train=dict(raw["train"], epochs=2))
    train(config_from_dict(other), resume=str(run))
    history = [json.loads(x) for x in (run / "metrics_history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    assert not (tmp_path / "elsewhere").exists()


def test_resume_of_a_mistyped_folder_is_an_error(tiny_cfg, tmp_path, capsys):
    raw = tiny_cfg("typo", train=QUICK)
    rc = main(["train", str(_yaml(raw, tmp_path / "t.yaml")), "--resume"])
    assert rc == 2
    line = _error_line(capsys)
    assert "nothing to resume" in line and raw["output_dir"] in line
    assert not Path(raw["output_dir"]).exists()
    rc = main(["train", str(_yaml(raw, tmp_path / "t.yaml")), "--resume", str(tmp_path / "nope")])
    assert rc == 2 and "no such run folder or checkpoint" in _error_line(capsys)


def test_resume_or_new_starts_when_there_is_nothing_to_resume(tiny_cfg, tmp_path):
    raw = tiny_cfg("fresh", train=QUICK)
    assert main(["train", str(_yaml(raw, tmp_path / "f.yaml")), "--resume-or-new"]) == 0
    assert (Path(raw["output_dir"]) / "checkpoints" / "last.ckpt").exists()


# ------------------------------------------------------------------ divergence never destroys the last good checkpoint
def _diverging(monkeypatch, bad_calls):
    """Make the classification loss NaN on the calls (1-based) that ``bad_calls`` accepts."""
    from aidkd.engine import module

    real = module.detection_losses
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if bad_calls(calls["n"]):
            losses["classification"] = losses["classification"] * float("nan")
        return losses

    monkeypatch.setattr(module, "detection_losses", flaky)
    return calls


def test_diverging_run_keeps_the_last_good_checkpoint_and_says_how_to_resume(tiny_cfg, tmp_path, monkeypatch,
                                                                             capsys):
    # 2 steps per epoch; steps 0-1 fine (last.ckpt at step 2), then NaN at step 2, fine at 3, NaN from step 4 on
    _diverging(monkeypatch, lambda n: n == 3 or n >= 5)
    raw = tiny_cfg("diverge", train={"epochs": 6, "limit_train_batches": 2, "limit_val_batches": 1,
                                     "max_bad_steps": 3, "val_every": 10})
    rc = main(["train", str(_yaml(raw, tmp_path / "d.yaml"))])
    assert rc == 2
    line = _error_line(capsys)
    last = Path(raw["output_dir"]) / "checkpoints" / "last.ckpt"
    assert "3 consecutive steps with non-finite losses" in line
    assert f"{last} (step 2)" in line and f"--resume {last} --set train.lr=0.001" in line
    assert torch.load(last, weights_only=True)["global_step"] == 2  # not rewritten after the bad steps


def test_skipped_step_changes_no_weight(tiny_cfg, monkeypatch):
    """A skipped step leaves the weights alone (no momentum or weight-decay update from a zero gradient); only
    batch-norm statistics move, as in any forward pass in training mode."""
    _diverging(monkeypatch, lambda n: n == 2)
    seen = {}

    class Watch(__import__("lightning").Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[batch_idx] = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}

    cfg = config_from_dict(tiny_cfg("skip", train={"epochs": 1, "limit_train_batches": 3, "limit_val_batches": 1}))
    train(cfg, extra_callbacks=[Watch()])
    assert all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # batch 1 was the skipped one
    assert not all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])


def test_resume_with_a_lower_learning_rate_uses_it(finished_run, tmp_path):
    """The advice after a non-finite stop (--resume ... --set train.lr=...) must take effect: Lightning restores the
    checkpoint's learning rate otherwise."""
    raw, out = finished_run
    import shutil

    shutil.copytree(out, tmp_path / "run")
    lrs = []

    class Watch(__import__("lightning").Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    cfg = dict(raw, output_dir=str(tmp_path / "run"), train=dict(raw["train"], epochs=2, lr=0.001))
    train(config_from_dict(cfg), resume=True, extra_callbacks=[Watch()])
    # step 1 of 2: both milestones (0.67, 0.89 of 2 steps) passed, factor 0.1 ** 2, times the new train.lr
    assert lrs == [pytest.approx(0.001 * 0.01)]


# ------------------------------------------------------------------ user errors: one line, exit 2, no traceback
class _Boom:
    def __reduce__(self):
        return (print, ("pickle code ran",))


@pytest.mark.parametrize("kind", ["malicious", "truncated"])
def test_bad_checkpoint_for_resume_and_eval_is_one_line(finished_run, tmp_path, capsys, kind):
    raw, out = finished_run
    bad = tmp_path / "bad.ckpt"
    if kind == "malicious":
        torch.save({"state_dict": _Boom()}, bad)
    else:
        bad.write_bytes((out / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    cfg = _yaml(dict(raw, output_dir=str(tmp_path / "r")), tmp_path / "c.yaml")
    for argv in (["train", str(cfg), "--resume", str(bad)], ["eval", str(cfg), "--checkpoint", str(bad)]):
        assert main(argv) == 2
        line = _error_line(capsys)
        assert line.startswith("error: cannot read checkpoint") and str(bad) in line
        assert "pickle code ran" not in line


def test_full_disk_is_one_line_naming_the_file(tiny_cfg, tmp_path, capsys, monkeypatch):
    import errno

    from aidkd.models import weights

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights.torch, "save", full)
    raw = tiny_cfg("full", train=QUICK)
    assert main(["train", str(_yaml(raw, tmp_path / "f.yaml"))]) == 2
    line = _error_line(capsys)
    assert f"No space left on device writing {raw['output_dir']}/" in line and "free some space" in line
    assert not list(Path(raw["output_dir"]).rglob("*.tmp"))  # the partial file is removed


def test_invalid_yaml_in_set_is_one_line(tiny_cfg, tmp_path, capsys):
    cfg = _yaml(tiny_cfg("y"), tmp_path / "y.yaml")
    assert main(["train", str(cfg), "--set", "train.lr=[1,"]) == 2
    assert _error_line(capsys).startswith("error: --set train.lr: invalid YAML value '[1,'")


def test_resume_with_another_model_size_is_one_line(finished_run, tmp_path, capsys):
    raw, out = finished_run
    import shutil

    shutil.copytree(out, tmp_path / "run")
    other = dict(raw, output_dir=str(tmp_path / "run"), model=dict(raw["model"], fpn_channels=32),
                 train=dict(raw["train"], epochs=2))
    assert main(["train", str(_yaml(other, tmp_path / "o.yaml")), "--resume"]) == 2
    line = _error_line(capsys)
    assert f"--resume {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}: its weights do not fit" in line
    assert "size mismatch" in line


def test_verbose_keeps_the_traceback(tiny_cfg, tmp_path):
    cfg = _yaml(tiny_cfg("v"), tmp_path / "v.yaml")
    with pytest.raises(ValueError, match="invalid YAML value"):
        main(["-v", "train", str(cfg), "--set", "train.lr=[1,"])


# ------------------------------------------------------------------ user text is never read as rich markup
@pytest.mark.parametrize("value", ["[/x]", "[bold]fast"])
def test_markup_in_user_values_is_printed_as_is(tiny_cfg, tmp_path, capsys, value):
    cfg = _yaml(tiny_cfg("m"), tmp_path / "m.yaml")
    assert main(["train", str(cfg), "--set", f"train.lr='{value}'"]) == 2
    assert f"got str '{value}'" in _error_line(capsys)


def test_markup_in_a_class_name_is_printed_as_is(tiny_cfg, tmp_path, capsys):
    raw = tiny_cfg("cls", data={"classes": ["[/x]", "[bold]Car"]})
    assert main(["train", str(_yaml(raw, tmp_path / "c.yaml"))]) == 2
    assert "['[/x]', '[bold]Car']" in _error_line(capsys)


# ------------------------------------------------------------------ YAML floats
def test_exponent_floats_are_floats(tmp_path):
    from aidkd.engine.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: 5E-5\n")
    cfg = load_config(path, ["train.momentum=1e-1", "train.max_bad_steps=7"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.momentum) == (1e-4, 5e-5, 0.1)
    assert cfg.train.max_bad_steps == 7 and type(cfg.train.max_bad_steps) is int
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"  # what plain YAML 1.1 does


def test_python_tags_stay_refused(tmp_path):
    from aidkd.engine.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


# ------------------------------------------------------------------ a kill never duplicates history or leaves junk
def test_kill_between_history_and_checkpoint_does_not_duplicate_an_epoch(finished_run, tmp_path):
    """Simulate the kill: last.ckpt is from before the last validation, whose history line is already written."""
    raw, out = finished_run
    import shutil

    run = tmp_path / "run"
    shutil.copytree(out, run)
    history = run / "metrics_history.jsonl"
    line = json.loads(history.read_text().splitlines()[0])
    history.write_text(json.dumps(line) + "\n" + json.dumps(dict(line, epoch=1, step=2)) + "\n" + '{"epo')
    train(config_from_dict(dict(raw, output_dir=str(run), train=dict(raw["train"], epochs=3))), resume=True)
    steps = [json.loads(x)["step"] for x in history.read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_partial_checkpoint_files_are_removed_on_start(finished_run, tmp_path):
    raw, out = finished_run
    import shutil

    run = tmp_path / "run"
    shutil.copytree(out, run)
    junk = [run / "checkpoints" / ".last.ckpt.k2j3.tmp", run / ".model_best.pt.x9.tmp"]
    for j in junk:
        j.write_bytes(b"\0" * 1000)
    keep = run / "checkpoints" / "notes.tmp"  # not a name save_checkpoint uses
    keep.write_text("mine")
    train(config_from_dict(dict(raw, output_dir=str(run), train=dict(raw["train"], epochs=2))), resume=True)
    assert not any(j.exists() for j in junk) and keep.exists()


# ------------------------------------------------------------------ COCO file_name never escapes the images folder
@pytest.mark.parametrize("name", ["../../outside/secret.png", "/dev/zero", "sub/../../b.jpg"])
def test_coco_file_name_outside_the_images_folder_is_refused(tmp_path, name):
    from aidkd.data import check_dataset, default_image_dir
    from tests.test_data_coco import base_json, write_coco

    data = base_json()
    ann = write_coco(tmp_path, data)
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes((default_image_dir(ann) / "b.jpg").read_bytes())
    data["images"][1]["file_name"] = name
    ann.write_text(json.dumps(data))
    problems = [str(p) for p in check_dataset(ann, fmt="coco")]
    assert any(f"{ann} [images[1].file_name]" in p and "outside the images folder" in p for p in problems), problems


def test_coco_file_name_in_a_sub_folder_is_fine(tmp_path):
    from aidkd.data import check_dataset, default_image_dir
    from tests.test_data_coco import base_json, write_coco

    data = base_json()
    ann = write_coco(tmp_path, data)
    d = default_image_dir(ann)
    (d / "sub").mkdir()
    (d / "b.jpg").rename(d / "sub" / "b.jpg")
    data["images"][1]["file_name"] = "sub/./b.jpg"
    ann.write_text(json.dumps(data))
    assert check_dataset(ann, fmt="coco") == []


# ------------------------------------------------------------------ smaller ones
def test_16_bit_png_is_scaled_by_its_depth_not_its_content(tmp_path):
    import numpy as np
    from PIL import Image

    from aidkd.data.images import read_image

    dark = np.full((8, 8), 200, np.uint16)  # a dark 16-bit frame (max <= 255)
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert np.asarray(read_image(tmp_path / "dark16.png"))[0, 0, 0] == round(200 / 65535 * 255)  # 1, not 200


def test_exif_orientation_is_noted_once(tmp_path, caplog):
    import logging

    from PIL import Image

    from aidkd.data import images

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (16, 8)).save(tmp_path / name, exif=exif)
    images._exif_noted = False
    with caplog.at_level(logging.WARNING, logger="aidkd.data"):
        assert images.read_image(tmp_path / "a.jpg").size == (16, 8)  # stored pixel order, as the boxes are
        images.read_image(tmp_path / "b.jpg")
    assert caplog.text.count("EXIF orientation 6 is ignored") == 1 and "a.jpg" in caplog.text


def test_kitti_number_with_an_underscore_is_refused():
    from aidkd.data.kitti import parse_kitti_line

    with pytest.raises(Exception, match=r"field 2 \(truncated\) is not a number: '1_0.00'"):
        parse_kitti_line("Car 1_0.00 0 0 1 1 10 10 1 1 1 1 1 1 0", file="x.txt", line=3)


def test_report_per_class_table_keeps_class_names_with_a_slash():
    from aidkd.eval.evaluator import metric_classes

    assert metric_classes({"coco/AP": 1.0, "coco/AP/bus/truck": 2.0, "voc/AP50/bus/truck": 3.0}) == ["bus/truck"]


def test_kitti_metrics_with_non_kitti_classes_fail_before_training(tiny_cfg, tmp_path, capsys):
    raw = tiny_cfg("classes", data={"classes": ["Car", "boat"]})
    assert main(["train", str(_yaml(raw, tmp_path / "c.yaml"))]) == 2
    line = _error_line(capsys)
    assert "need KITTI classes" in line and "'boat'" in line and "eval.kitti: false" in line
    assert not Path(raw["output_dir"]).exists()


def test_huge_loss_scale_warns(tmp_path, caplog):
    import logging

    from aidkd.engine.module import DetectionTask
    from aidkd.models import build_detector, model_meta, save_model_file
    from tests.conftest import TINY_MODEL

    teacher = build_detector("retinanet", "resnet18", 4, min_size=64, max_size=192, fpn_channels=16)
    tfile = save_model_file(tmp_path / "t.pt", teacher, model_meta(teacher, ["Car", "Pedestrian", "Cyclist"],
                                                                   64, 192, {}))
    cfg = config_from_dict({"model": TINY_MODEL, "data": {"min_size": 64, "max_size": 192},
                            "distill": {"teacher": {"checkpoint": str(tfile)}, "methods": [{"name": "attention"}],
                                        "loss_scale": 1e4}})
    with caplog.at_level(logging.WARNING, logger="aidkd.engine"):
        DetectionTask(cfg, ["Car", "Pedestrian", "Cyclist"])
    assert "distill.loss_scale=10000 multiplies every distillation term" in caplog.text
    # the advice is the one docs/method.md gives
    assert "small from-scratch students need about 1/1000" in caplog.text
    assert "small from-scratch students need about 1/1000" in (Path(__file__).parents[1] / "docs" / "method.md").read_text()


def test_utf16_config_error_names_the_file(tmp_path, capsys):
    path = tmp_path / "u16.yaml"
    path.write_text("name: x\n", encoding="utf-16")
    assert main(["train", str(path)]) == 2
    assert f"{path}: not UTF-8 text" in _error_line(capsys)


# ------------------------------------------------------------------ short runs still write best.ckpt, no warning
@pytest.mark.parametrize("train_cfg", [{"epochs": 5, "max_steps": 1, "limit_train_batches": 2},
                                       {"epochs": 1, "val_every": 2, "limit_train_batches": 1}],
                         ids=["max_steps_before_validation", "val_every_beyond_epochs"])
def test_short_run_writes_best_ckpt_without_monitor_warning(tiny_cfg, train_cfg, recwarn):
    cfg = config_from_dict(tiny_cfg("short", train=dict(train_cfg, limit_val_batches=1)))
    metrics = train(cfg)
    best = Path(cfg.output_dir) / "checkpoints" / "best.ckpt"
    assert best.exists()
    assert torch.load(best, weights_only=True)["global_step"] == 1 and "coco/AP" in metrics
    assert not [w for w in recwarn if "could not find the monitored key" in str(w.message)]


# ------------------------------------------------------------------ output a user can read and trust
def test_set_before_the_config_does_not_swallow_it(tiny_cfg, tmp_path, capsys):
    raw = tiny_cfg("swallow")
    cfg = _yaml(raw, tmp_path / "s.yaml")
    # eval of a missing checkpoint: fails after the config was read with the override applied
    assert main(["eval", "--set", "train.lr=1e-3", "data.batch_size=2", str(cfg), "--checkpoint", "nope.pt"]) == 2
    assert "checkpoint not found: nope.pt" in _error_line(capsys)
    assert main(["train", "--resume", str(cfg)]) == 2  # `--resume CONFIG`: resumes the config's output_dir
    assert "nothing to resume" in _error_line(capsys)


def test_version(capsys):
    from aidkd import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"aidkd {__version__}"


def test_every_cli_option_has_help_and_a_readme_row():
    import argparse
    import re

    from aidkd.cli.main import build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    cli_table = readme[readme.index("## CLI"):readme.index("## What the results say")]
    rows = [line for line in cli_table.splitlines() if line.startswith("| `aidkd")]
    missing_help, missing_readme = [], []

    def row_of(path: str) -> str:
        return next((r for r in rows if r.startswith((f"| `{path} ", f"| `{path}`"))), "")

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction):
                if not action.help:
                    missing_help.append(f"{path} {action.dest}")
                for flag in action.option_strings:
                    if path != "aidkd" and flag.startswith("--") and not re.search(rf"{flag}\b(?!-)", row_of(path)):
                        missing_readme.append(f"{path} {flag}")

    for action in build_parser()._actions:  # the top-level options: in the text under the table
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help" and flag not in cli_table:
                missing_readme.append(f"aidkd {flag}")
    walk(build_parser(), "aidkd")
    assert not missing_help, missing_help
    assert not missing_readme, missing_readme


def test_console_output_is_not_wrapped_at_80_columns(tiny_cfg, tmp_path, capsys):
    long_dir = tmp_path / ("x" * 120)
    raw = tiny_cfg("w", train=QUICK)
    raw["output_dir"] = str(long_dir)
    long_dir.mkdir()
    (long_dir / "old.txt").write_text("")
    assert main(["train", str(_yaml(raw, tmp_path / "w.yaml"))]) == 2
    assert str(long_dir) in _error_line(capsys)  # one line, path whole


def test_metrics_table_says_what_each_value_is():
    from aidkd.eval import format_metrics_table

    table = format_metrics_table({"coco/AP": 12.3456, "kitti/Car/moderate": 50.0, "voc/AP50/a/b": float("nan")})
    assert "| Metric | Value (%) | Meaning |" in table
    assert "| coco/AP | 12.35 | COCO AP, IoU 0.50:0.95, mean over classes |" in table
    assert "| kitti/Car/moderate | 50.00 | KITTI AP\\|R40 of class Car, moderate |" in table
    assert "| voc/AP50/a/b | n/a | VOC AP at IoU 0.5 of class a/b |" in table


def test_data_check_prints_a_summary(synth_root, capsys):
    from aidkd.data.check import dataset_summary

    summary = dataset_summary(synth_root)
    assert summary["images"] == 20 and summary["boxes"]["Car"] > 0
    main(["data", "check", str(synth_root)])
    out = capsys.readouterr().out
    assert f"20 images ({summary['images_without_boxes']} without boxes)" in out
    assert f"Car {summary['boxes']['Car']}" in out


def test_corrupt_image_message_has_no_python_object_repr(tmp_path):
    from aidkd.data import DatasetError
    from aidkd.data.images import read_image

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(DatasetError) as err:
        read_image(bad)
    assert str(bad) in str(err.value) and "BytesIO" not in str(err.value) and "0x" not in str(err.value)


# ------------------------------------------------------------------ exact resume after Ctrl-C or SIGTERM
class _SignalAtFirstEpochEnd(__import__("lightning").Callback):
    def __init__(self, signum):
        self.signum = signum

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            import os

            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def two_epoch_run(synth_root, tmp_path_factory):
    """An uninterrupted two-epoch run (two steps an epoch), the reference of the interrupted ones."""
    from tests.conftest import TINY_DATA, TINY_MODEL

    out = tmp_path_factory.mktemp("two_epochs") / "run"
    raw = {"name": "two", "output_dir": str(out), "seed": 0, "data": dict(TINY_DATA, root=str(synth_root)),
           "model": dict(TINY_MODEL), "train": {"epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1,
                                                "progress_bar": False, "warmup_steps": 1, "log_every": 1}}
    torch.set_num_threads(1)
    metrics = train(config_from_dict(raw))
    return raw, out, metrics


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_at_an_epoch_end_resumes_exactly(two_epoch_run, tmp_path, signame):
    import signal

    from aidkd.models import load_detector

    raw, full_dir, full_metrics = two_epoch_run
    signum = getattr(signal, signame)
    cfg = dict(raw, output_dir=str(tmp_path / "run"))
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        train(config_from_dict(cfg), extra_callbacks=[_SignalAtFirstEpochEnd(signum)])
    assert stopped.value.code == 128 + signum
    assert signal.getsignal(signal.SIGINT) is handler  # the run's Ctrl-C handler is gone
    interrupted = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    progress = torch.load(interrupted, weights_only=True)["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert progress["completed"] == progress["processed"] == 1  # the epoch is recorded as done
    resumed = train(config_from_dict(cfg), resume=str(interrupted))
    assert resumed == pytest.approx(full_metrics, nan_ok=True)
    a = load_detector(full_dir / "model_last.pt")[0].state_dict()
    b = load_detector(tmp_path / "run" / "model_last.pt")[0].state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    history = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics_history.jsonl").read_text().splitlines()]
    assert history == [2, 4]


# ------------------------------------------------------------------ one error line, never a traceback
def test_disk_full_inside_torch_save_is_one_line(tiny_cfg, tmp_path, capsys, monkeypatch):
    """torch.save's zip writer hides ENOSPC behind its own RuntimeError."""
    import shutil

    from aidkd.models import weights

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 3984")

    monkeypatch.setattr(weights.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 1000, 1000))
    raw = tiny_cfg("full", train=QUICK)
    assert main(["train", str(_yaml(raw, tmp_path / "f.yaml"))]) == 2
    line = _error_line(capsys)
    assert f"No space left on device (0 MiB free) writing {raw['output_dir']}/" in line and "free some space" in line
    assert not list(Path(raw["output_dir"]).rglob("*.tmp"))


@pytest.mark.parametrize("kind", ["malicious", "truncated"])
def test_bad_backbone_weights_file_is_one_line(tiny_cfg, tmp_path, capsys, kind):
    from torchvision.models import resnet18

    bad = tmp_path / "backbone.pth"
    if kind == "malicious":
        torch.save({"conv1.weight": _Boom()}, bad)
    else:
        torch.save(resnet18().state_dict(), bad)
        bad.write_bytes(bad.read_bytes()[:5000])
    raw = tiny_cfg("bb", train=QUICK, model={"backbone_weights": str(bad)})
    assert main(["train", str(_yaml(raw, tmp_path / "b.yaml"))]) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "pickle code ran" not in out.out + out.err
    line = out.err.strip().splitlines()[-1]
    assert line.startswith("error: cannot read checkpoint") and str(bad) in line
    assert not Path(raw["output_dir"]).exists()


def test_ctrl_c_while_the_final_table_prints_is_one_line(finished_run, tmp_path, capsys, monkeypatch):
    from aidkd.cli import main as cli

    raw, out = finished_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_print_metrics", interrupted)
    cfg = _yaml(dict(raw, output_dir=str(tmp_path / "r")), tmp_path / "c.yaml")
    try:
        rc = main(["eval", str(cfg), "--checkpoint", str(out / "model_best.pt"), "--json", str(tmp_path / "m.json")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended in a traceback")
    assert rc == 130
    assert capsys.readouterr().err.strip().splitlines() == ["error: interrupted (Ctrl-C)"]


def test_data_synth_of_a_huge_size_is_refused_before_anything_is_written(tmp_path, capsys):
    from aidkd.data import generate_synth

    with pytest.raises(SystemExit) as refused:
        main(["data", "synth", str(tmp_path / "s"), "--num-images", "1", "--width", "100000", "--height", "100000"])
    assert refused.value.code == 2
    assert "argument --width: must be in [16, 8192], got '100000'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"100000x64: width and height must be in \[16, 8192\]"):
        generate_synth(tmp_path / "s", 1, width=100000, height=64)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ YAML aliases cannot explode
def _alias_bomb(levels: int) -> str:
    """A YAML flow value of ``levels`` nested anchors, each repeating the one before ten times: 10^levels values."""
    first = "&a0 [" + ", ".join(["x"] * 10) + "]"
    return "[" + ", ".join([first] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]"
                                      for i in range(1, levels)]) + "]"


@pytest.mark.parametrize("where", ["name", "model.kwargs", "--set"])
def test_yaml_alias_bomb_is_refused_fast(tiny_cfg, tmp_path, capsys, where):
    import time

    bomb = _alias_bomb(6)  # 10^6 values from 400 characters (9 levels: 10^9, minutes and gigabytes)
    raw = tiny_cfg("bomb")
    path = _yaml(raw, tmp_path / "b.yaml")
    argv = ["train", str(path)]
    if where == "name":
        path.write_text(path.read_text().replace("name: bomb", f"name: {bomb}"))
    elif where == "model.kwargs":
        path.write_text(path.read_text().replace("model:\n", f"model:\n  kwargs: {{k: {bomb}}}\n"))
    else:
        argv += ["--set", f"name={bomb}"]
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 5
    line = _error_line(capsys)
    assert "expands to more than 100000 values" in line and len(line) < 1000
    assert not Path(raw["output_dir"]).exists()


def test_recursive_yaml_alias_is_refused(tmp_path):
    from aidkd.engine.config import ConfigError, load_config

    path = tmp_path / "r.yaml"
    path.write_text("name: &n [a, *n]\n")
    with pytest.raises(ConfigError, match="an alias refers to a value that contains it"):
        load_config(path)


# ------------------------------------------------------------------ stdout: results; stderr: errors and warnings
def test_errors_go_to_stderr_and_stdout_stays_clean(tiny_cfg, tmp_path, capsys):
    cfg = _yaml(tiny_cfg("e"), tmp_path / "e.yaml")
    assert main(["eval", str(cfg), "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip() == f"error: checkpoint not found: {tmp_path / 'nope.pt'}"


def test_dataset_symlink_out_of_the_root_is_named_on_stderr(synth_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "kitti"
    shutil.copytree(synth_root, root)
    label = root / "training" / "label_2" / "000001.txt"
    outside = tmp_path / "elsewhere.txt"
    shutil.move(label, outside)
    label.symlink_to(outside)
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr()
    assert "dataset OK" in out.out and "symbolic links" not in out.out
    assert f"1 file(s) of {root} are symbolic links out of it (read as they are): {label} -> {outside}" in out.err


# ------------------------------------------------------------------ smaller ones
def test_weights_with_another_class_count_name_the_file_and_count_classes(tmp_path):
    from aidkd.models import build_detector, model_meta, save_model_file

    det = build_detector("retinanet", "resnet18", 4, min_size=64, max_size=192, fpn_channels=16)
    path = save_model_file(tmp_path / "three.pt", det, model_meta(det, ["Car", "Pedestrian", "Cyclist"], 64, 192, {}))
    with pytest.raises(ValueError) as err:
        build_detector("retinanet", "resnet18", 3, fpn_channels=16, weights=path)
    assert f"weights {path}: " in str(err.value)
    assert "3 classes (+ background) in the checkpoint, 2 expected" in str(err.value)


def test_export_to_a_folder_is_refused_and_leaves_no_tmp(finished_run, tmp_path, capsys):
    _, out = finished_run
    folder = tmp_path / "onnx"
    folder.mkdir()
    assert main(["export", str(out / "model_best.pt"), "--onnx", str(folder)]) == 2
    line = _error_line(capsys)
    assert f"--onnx {folder} is a folder" in line and str(folder / "model.onnx") in line
    assert list(tmp_path.rglob("*.tmp")) == [] and list(folder.iterdir()) == []


def test_resume_of_a_finished_run_is_a_no_op_that_says_so(finished_run, tmp_path, caplog):
    import logging
    import shutil

    raw, out = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = _snapshot(run)
    with caplog.at_level(logging.INFO, logger="aidkd.engine"):
        metrics = train(config_from_dict(dict(raw, output_dir=str(run))), resume=True)
    assert _snapshot(run) == before  # no history line, no new log version, config.yaml untouched
    assert "the run already finished" in caplog.text and "nothing to resume" in caplog.text
    stored = json.loads((run / "final_metrics.json").read_text())
    assert metrics == pytest.approx({k: float("nan") if v is None else v for k, v in stored.items()}, nan_ok=True)


@pytest.mark.parametrize("argv", [
    ["predict", "c.yaml", "--checkpoint", "m.pt", "--out", "o", "--score-thresh", "nan"],
    ["predict", "c.yaml", "--checkpoint", "m.pt", "--out", "o", "--score-thresh", "1.5"],
    ["analyze", "c.yaml", "--teacher", "m.pt", "--out", "o", "--score-thresh", "inf"],
    ["data", "synth", "o", "--hard-fraction", "-0.1"],
    ["data", "synth", "o", "--num-images", "-5"],
    ["export", "m.pt", "--onnx", "m.onnx", "--samples", "0"],
], ids=["nan", "above_one", "inf", "negative_fraction", "negative_count", "zero_samples"])
def test_numeric_cli_arguments_are_range_checked(argv, capsys):
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    assert f"argument {argv[-2]}: must be in [" in capsys.readouterr().err


def test_errors_quote_a_few_hundred_characters_of_input(tiny_cfg, tmp_path, capsys):
    from aidkd.data import DatasetError

    err = DatasetError(f"a message quoting {'x' * 5_000_000}, then its end", file="x.txt", line=3)
    assert str(err).startswith("x.txt:3: a message quoting xxx") and str(err).endswith("xxx, then its end")
    assert "[... 4999" in str(err) and len(str(err)) < 500
    cfg = _yaml(tiny_cfg("long"), tmp_path / "l.yaml")
    assert main(["train", str(cfg), "--set", "train.lr=[" + "1, " * 30_000]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: --set train.lr: invalid YAML value") and len(line) < 1100


def test_json_outputs_are_strict_json(finished_run):
    from aidkd.eval import strict_json

    assert strict_json({"a": float("nan"), "b": [1.5, float("inf")]}) == '{"a": null, "b": [1.5, null]}'
    _, out = finished_run

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    final = json.loads((out / "final_metrics.json").read_text(), parse_constant=refuse)
    assert None in final.values()  # this one-step run has classes without an AP
    for line in (out / "metrics_history.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    json.loads((out / "best_metrics.json").read_text(), parse_constant=refuse)


def test_links_out_of_a_dataset_are_warned_once_a_process(tmp_path, caplog):
    """A training run reads its dataset several times (data check, train split, val split): one warning, not one
    per read; another set of links out of the same root is warned again."""
    from aidkd.data.scan import warn_links_out

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    links = []
    for name in ("a.txt", "b.txt"):
        (outside / name).write_text("x")
        (root / name).symlink_to(outside / name)
        links.append(root / name)
    with caplog.at_level("WARNING", logger="aidkd.data"):
        for _ in range(3):
            assert warn_links_out(root, links[:1]) == links[:1]
        warn_links_out(root, links)
    assert [r.getMessage().split(" are ")[0] for r in caplog.records] == [f"1 file(s) of {root}",
                                                                        f"2 file(s) of {root}"]
