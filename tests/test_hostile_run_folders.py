"""What aidkd promises about the files it writes (README "Failure behaviour"): nothing a user owns is overwritten or
deleted, a refused command leaves every folder as it was, and no model file is written from a diverged state.

Helpers come from test_hostile_inputs.py, the shared finished run from conftest.py. To add a case: put it under its section, make
it fail on the code you are fixing, and assert on the message and on the files.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import typing
from pathlib import Path

import pytest
import torch
import yaml

from aidkd.cli.main import main
from aidkd.engine.config import config_from_dict
from aidkd.engine.run import train
from tests.conftest import QUICK
from tests.test_hostile_inputs import _diverging, _error_line, _snapshot, _yaml


def _raw_yaml(raw: dict, path: Path) -> Path:
    """A config file as a user would write it (no validation on the way)."""
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _copy(out: Path, to: Path) -> Path:
    shutil.copytree(out, to, symlinks=True)
    return to


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes (links not followed): what a refusal must leave as it was."""
    return {str(p.relative_to(folder)): (p.read_bytes() if not p.is_symlink() else b"->" + str(p.readlink()).encode())
            for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


# ------------------------------------------------------------------ --overwrite deletes only what aidkd wrote
def test_overwrite_refuses_a_folder_no_aidkd_run_made(tiny_cfg, tmp_path, capsys):
    raw = tiny_cfg("users", train=QUICK)
    out = Path(raw["output_dir"])
    for name in ("config.yaml", "metrics_history.jsonl", "csv/a.csv", "tb/x", "checkpoints/mine.ckpt",
                 "analysis/notes.md"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"the user's {name}")
    before = _tree(out)
    assert main(["train", str(_yaml(raw, tmp_path / "u.yaml")), "--overwrite"]) == 2
    line = _error_line(capsys)
    assert f"--overwrite: output_dir {out} was not made by an aidkd run" in line and "nothing was deleted" in line
    assert _tree(out) == before


def test_overwrite_refuses_a_run_folder_holding_a_user_file(finished_run, tmp_path, capsys):
    raw, out = finished_run
    run = _copy(out, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    before = _tree(run)
    assert main(["train", str(_yaml(dict(raw, output_dir=str(run)), tmp_path / "c.yaml")), "--overwrite"]) == 2
    line = _error_line(capsys)
    assert f"output_dir {run} holds notes.txt, which aidkd did not write" in line
    assert _tree(run) == before


@pytest.mark.parametrize("where", ["checkpoints", "tb/link"])
def test_overwrite_never_follows_a_symbolic_link(finished_run, tmp_path, capsys, where):
    raw, out = finished_run
    run = _copy(out, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.ckpt").write_text("the user's")
    if where == "checkpoints":
        shutil.rmtree(run / "checkpoints")
    (run / where).symlink_to(outside, target_is_directory=True)
    before = _tree(run)
    assert main(["train", str(_yaml(dict(raw, output_dir=str(run)), tmp_path / "c.yaml")), "--overwrite"]) == 2
    assert f"holds symbolic links ({where})" in _error_line(capsys)
    assert (outside / "precious.ckpt").read_text() == "the user's" and _tree(run) == before


def test_a_file_recorded_by_aidkd_is_removed_by_overwrite(finished_run, tmp_path):
    from aidkd.engine.run_folder import RUN_RECORD, record_run_file

    raw, out = finished_run
    run = _copy(out, tmp_path / "run")
    (run / "splits").mkdir()
    (run / "splits" / "train.txt").write_text("000001\n")
    record_run_file(run, "splits")  # how another aidkd writer (split files, reports) adds its files
    train(config_from_dict(dict(raw, output_dir=str(run))), overwrite=True)
    assert not (run / "splits").exists()
    assert "splits" not in json.loads((run / RUN_RECORD).read_text())["entries"]  # the new run's own record


# ------------------------------------------------------------------ outputs of other commands
def test_coco_traffic_onto_its_input_is_refused(tmp_path, capsys):
    from tests.test_data_coco import base_json, write_coco

    ann = write_coco(tmp_path, base_json())
    before = ann.read_bytes()
    for extra in ([], ["--force"]):
        assert main(["data", "coco-traffic", str(ann), str(ann), *extra]) == 2
        assert f"out_json {ann} is also an input" in _error_line(capsys)
    assert ann.read_bytes() == before


def test_named_output_files_are_replaced_only_with_force(finished_run, tmp_path, capsys):
    raw, out = finished_run
    cfg = _yaml(raw, tmp_path / "c.yaml")
    mine = tmp_path / "mine.json"
    mine.write_text("the user's")
    commands = {"eval": ["eval", str(cfg), "--checkpoint", str(out / "model_best.pt"), "--json", str(mine)],
                "eval-kitti": ["eval-kitti", str(tmp_path), str(tmp_path), "--json", str(mine)],
                "export": ["export", str(out / "model_best.pt"), "--onnx", str(mine)],
                "report": ["report", str(out), "--out", str(mine)],
                "coco-traffic": ["data", "coco-traffic", str(tmp_path / "in.json"), str(mine)]}
    for name, argv in commands.items():
        assert main(argv) == 2, name
        line = _error_line(capsys)
        assert f"{mine} exists; add --force to replace it" in line, (name, line)
        assert mine.read_text() == "the user's", name
    assert main(commands["eval"] + ["--force"]) == 0
    assert "coco/AP" in json.loads(mine.read_text())


def test_predict_refuses_a_folder_of_user_files(finished_run, tmp_path, capsys):
    raw, out = finished_run
    cfg = _yaml(raw, tmp_path / "c.yaml")
    users = tmp_path / "users"
    users.mkdir()
    (users / "000001.txt").write_text("the user's")
    argv = ["predict", str(cfg), "--checkpoint", str(out / "model_best.pt"), "--out"]
    assert main(argv + [str(users)]) == 2
    assert f"--out {users} holds files aidkd did not write (000001.txt)" in _error_line(capsys)
    assert _tree(users) == {"000001.txt": b"the user's"}
    fresh = tmp_path / "fresh"
    assert main(argv + [str(fresh)]) == 0 and main(argv + [str(fresh)]) == 0  # its own folder: again is fine
    assert len(list(fresh.glob("*.txt"))) == 4


# ------------------------------------------------------------------ no model file from a diverged state
def _rising_metric(monkeypatch):
    """Each validation scores higher than the one before, so every validation would make a new best."""
    from aidkd.engine import module

    seen = {"n": 0}

    class Rising:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, *args):
            pass

        def compute(self):
            seen["n"] += 1
            return {"coco/AP": float(seen["n"])}

    monkeypatch.setattr(module, "DetectionEvaluator", Rising)


def test_model_files_are_never_written_from_a_diverged_state(tiny_cfg, tmp_path, monkeypatch):
    # 2 steps an epoch, a validation after each; a NaN loss on the first step of epoch 1 (step 2): its validation
    # (step 4) is within max_bad_steps of it, so nothing of epoch 1 may be saved, also not by a resumed run
    _rising_metric(monkeypatch)
    raw = tiny_cfg("diverged", train={"epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1,
                                      "max_bad_steps": 3})
    out = Path(raw["output_dir"])

    def steps() -> dict[str, int]:
        def load(name: str) -> dict:
            return torch.load(out / name, weights_only=True)

        return {"model_last.pt": int(load("model_last.pt")["metrics"]["step"]),
                "model_best.pt": int(load("model_best.pt")["metrics"]["step"]),
                "best.ckpt": load("checkpoints/best.ckpt")["global_step"],
                "last.ckpt": load("checkpoints/last.ckpt")["global_step"]}

    calls = _diverging(monkeypatch, lambda n: n == 3)
    train(config_from_dict(raw))
    assert steps() == dict.fromkeys(["model_last.pt", "model_best.pt", "best.ckpt", "last.ckpt"], 2)
    calls["n"] = 2  # the resumed run replays epoch 1 from last.ckpt (step 2): NaN again on its first step
    train(config_from_dict(raw), resume=True)
    assert steps() == dict.fromkeys(["model_last.pt", "model_best.pt", "best.ckpt", "last.ckpt"], 2)


# ------------------------------------------------------------------ bad values refused before anything is written
@pytest.mark.parametrize("key,value", [("data.batch_size", 0), ("data.batch_size", -1), ("train.lr", float("nan")),
                                       ("train.lr", float("inf")), ("train.epochs", -3), ("train.epochs", 0)])
def test_out_of_range_values_are_refused_naming_key_and_file(tiny_cfg, tmp_path, capsys, key, value):
    raw = tiny_cfg("range")
    section, name = key.split(".")
    raw[section][name] = value
    cfg = _raw_yaml(raw, tmp_path / "r.yaml")
    assert main(["train", str(cfg)]) == 2
    assert re.search(rf"^error: {re.escape(str(cfg))}: config key '{key}': must be .*, got {value!r}$",
                     _error_line(capsys)), key
    assert not Path(raw["output_dir"]).exists()


def test_every_numeric_config_key_has_a_range():
    from aidkd.engine import config

    missing, checked = [], 0

    def walk(cls) -> None:
        nonlocal checked
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if any(dataclasses.is_dataclass(a) for a in inner):
                walk(next(a for a in inner if dataclasses.is_dataclass(a)))
            elif re.search(r"\b(int|float)\b", str(tp)):
                checked += 1
                if f"{cls.__name__}.{f.name}" not in config.NUMERIC_RANGES:
                    missing.append(f"{cls.__name__}.{f.name}")

    walk(config.RunConfig)
    assert not missing, missing
    assert checked == len(config.NUMERIC_RANGES)  # no entry for a field that does not exist
    config.check_ranges(config.RunConfig(distill=config.DistillConfig()))  # the defaults are valid


def test_empty_split_file_is_a_data_check_error(synth_root, tiny_cfg, tmp_path, capsys):
    from aidkd.data import check_dataset

    root = shutil.copytree(synth_root, tmp_path / "data")
    (root / "ImageSets" / "train.txt").write_text("\n")
    problems = [str(p) for p in check_dataset(root)]
    assert any(str(root / "ImageSets" / "train.txt") in p and "lists no frame" in p for p in problems), problems
    raw = tiny_cfg("empty_split", data={"format": "kitti", "root": str(root)}, train=QUICK)
    assert main(["train", str(_yaml(raw, tmp_path / "e.yaml"))]) == 2
    assert "lists no frame" in capsys.readouterr().err
    assert not Path(raw["output_dir"]).exists()


# ------------------------------------------------------------------ --resume: check first, write after
@pytest.mark.parametrize("change,expected", [
    ({"model": {"fpn_channels": 32}}, "its weights do not fit this config's model"),
    ({"train": {"epochs": 1}}, "the run is at epoch 2; train.epochs=1 would end it before that"),
    ({"data": {"batch_size": 2}, "train": {"momentum": 0.5}},
     "the config differs from the run's in data.batch_size (4 -> 2), train.momentum (0.9 -> 0.5)"),
], ids=["other_model", "fewer_epochs_than_done", "other_settings"])
def test_refused_resume_leaves_the_run_folder_as_it_was(finished_run, tmp_path, capsys, change, expected):
    raw, out = finished_run
    run = _copy(out, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    saved = dict(state["aidkd_config"], train=dict(state["aidkd_config"]["train"], epochs=4))
    state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] = 2
    torch.save(dict(state, epoch=1, aidkd_config=saved), last)  # as if saved at the end of epoch 2 of 4
    raw = dict(raw, output_dir=str(run), train=dict(raw["train"], epochs=4))
    for section, values in change.items():
        raw[section] = dict(raw[section], **values)
    before = _snapshot(run)
    assert main(["train", str(_yaml(raw, tmp_path / "c.yaml")), "--resume"]) == 2
    line = _error_line(capsys)
    assert f"--resume {run / 'checkpoints' / 'last.ckpt'}: {expected}" in line, line
    assert _snapshot(run) == before


# ------------------------------------------------------------------ a run killed before its first checkpoint
def test_resume_or_new_restarts_a_run_killed_before_its_first_checkpoint(tiny_cfg, tmp_path):
    import lightning as L

    class Killed(Exception):
        pass

    class KillAtFirstStep(L.Callback):
        def on_train_batch_start(self, *args):
            raise Killed

    raw = tiny_cfg("killed", train=QUICK)
    out = Path(raw["output_dir"])
    with pytest.raises(Killed):
        train(config_from_dict(raw), extra_callbacks=[KillAtFirstStep()])
    assert (out / "config.yaml").exists() and not (out / "checkpoints" / "last.ckpt").exists()
    partial = out / "checkpoints" / ".last.ckpt.k2j3.tmp"  # the interrupted write of the first last.ckpt
    partial.parent.mkdir(exist_ok=True)
    partial.write_bytes(b"\0" * 1000)
    assert main(["train", str(_yaml(raw, tmp_path / "k.yaml")), "--resume-or-new"]) == 0
    assert not partial.exists() and (out / "checkpoints" / "last.ckpt").exists()
    assert len((out / "metrics_history.jsonl").read_text().splitlines()) == 1


def test_resume_or_new_still_refuses_a_folder_with_more_than_start_up_files(tiny_cfg, tmp_path, capsys):
    raw = tiny_cfg("more", train=QUICK)
    out = Path(raw["output_dir"])
    (out / "csv").mkdir(parents=True)
    (out / "config.yaml").write_text("the user's")  # start-up names, but no run record: not proven aidkd's
    assert main(["train", str(_yaml(raw, tmp_path / "m.yaml")), "--resume-or-new"]) == 2
    assert f"output_dir {out} is not empty (config.yaml, csv)" in _error_line(capsys)
    assert (out / "config.yaml").read_text() == "the user's"


# ------------------------------------------------------------------ the divergence advice works as printed
def _advice(line: str) -> list[str]:
    """The options the message tells to run again with (up to a comma, a parenthesis or the end)."""
    found = re.search(r"(?:start again in this folder with|with a lower learning rate:) (--[^,(]*)", line)
    assert found, line
    return found.group(1).strip().rstrip(".").split()


def test_divergence_advice_without_a_checkpoint_works_as_printed(tiny_cfg, tmp_path, monkeypatch, capsys):
    _diverging(monkeypatch, lambda n: True)
    raw = tiny_cfg("diverge_at_once", train={"epochs": 1, "limit_train_batches": 3, "limit_val_batches": 1,
                                             "max_bad_steps": 2})
    cfg = _yaml(raw, tmp_path / "d.yaml")
    assert main(["train", str(cfg)]) == 2
    advice = _advice(_error_line(capsys))
    assert advice == ["--overwrite", "--set", "train.lr=0.001"]
    monkeypatch.undo()
    assert main(["train", str(cfg), *advice]) == 0


def test_divergence_advice_with_a_checkpoint_works_as_printed(tiny_cfg, tmp_path, monkeypatch, capsys):
    _diverging(monkeypatch, lambda n: n >= 3)  # steps 0-1 fine: last.ckpt at step 2
    raw = tiny_cfg("diverge_later", train={"epochs": 3, "limit_train_batches": 2, "limit_val_batches": 1,
                                           "max_bad_steps": 2, "val_every": 10})
    cfg = _yaml(raw, tmp_path / "d.yaml")
    assert main(["train", str(cfg)]) == 2
    advice = _advice(_error_line(capsys))
    last = Path(raw["output_dir"]) / "checkpoints" / "last.ckpt"
    assert advice == ["--resume", str(last), "--set", "train.lr=0.001"]
    monkeypatch.undo()
    assert main(["train", str(cfg), *advice]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_eval_beside_a_run_checkpoint_leaves_a_folder_overwrite_can_clear(finished_run, tmp_path, capsys):
    """`aidkd eval RUN/model_best.pt` writes its metrics beside the checkpoint: the run records that file, so a later
    `--overwrite` of the run is not refused as a folder holding a user's file."""
    raw, out = finished_run
    run = _copy(out, tmp_path / "run")
    config = _yaml(dict(raw, output_dir=str(run)), tmp_path / "c.yaml")
    assert main(["eval", str(config), "--checkpoint", str(run / "model_best.pt")]) == 0
    assert (run / "model_best.val_metrics.json").is_file()
    assert main(["train", str(config), "--overwrite"]) == 0, capsys.readouterr().err
    assert not (run / "model_best.val_metrics.json").exists()
